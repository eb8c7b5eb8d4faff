//! edgeHub's routes (edgehub-contract.md §3): `FROM source [WHERE condition] INTO sink`,
//! compiled once and evaluated per message.
//!
//! - `syntax`: the grammar, read into a [`syntax::Route`] with positions;
//! - `condition`: WHERE conditions, type-checked at compile time and evaluated with
//!   three-valued logic;
//! - `table`: [`table::RouteTable`], a manifest's routes, and where a message goes by them.
//!
//! A route that does not parse or type-check is refused with its name and the position of
//! what is wrong, so a bad manifest never half-applies.

pub mod condition;
pub mod syntax;
pub mod table;

use condition::MessageView;
use syntax::{Expr, Sink};

/// The priority of a route that names none: below 0–9 (edgeHub's 2,000,000,000).
pub const PRIORITY_DEFAULT: u32 = 2_000_000_000;

/// A route, ready to evaluate.
#[derive(Debug, Clone, PartialEq)]
pub struct CompiledRoute {
    pub name: String,
    /// The source as matched: trailing `*` and `/` trimmed, then one `/` appended, lower case.
    source_prefix: String,
    condition: Option<Expr>,
    pub sink: Sink,
    /// 0 (highest) to 9, or `PRIORITY_DEFAULT`.
    pub priority: u32,
    /// Seconds a message routed by it lives in its queue; `None`: the global time to live.
    pub time_to_live_secs: Option<u32>,
}

/// Why a route was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    #[error("route {name:?} at {at}: {message}")]
    Invalid {
        name: String,
        at: usize,
        message: String,
    },
    #[error("route name {0:?} is not allowed: it may not contain '.', '$', '#' or spaces")]
    BadName(String),
    #[error("route {name:?}: priority {priority} is not 0 to 9")]
    BadPriority { name: String, priority: u32 },
}

impl CompiledRoute {
    /// Parses and type-checks a route.
    ///
    /// # Errors
    /// What is wrong, with the route's name and the position in it.
    pub fn compile(
        name: &str,
        text: &str,
        priority: Option<u32>,
        time_to_live_secs: Option<u32>,
    ) -> Result<CompiledRoute, RouteError> {
        if name.is_empty() || name.contains(['.', '$', '#', ' ']) {
            return Err(RouteError::BadName(name.to_owned()));
        }
        if let Some(priority) = priority.filter(|p| *p > 9) {
            return Err(RouteError::BadPriority {
                name: name.to_owned(),
                priority,
            });
        }
        let invalid = |at: usize, message: String| RouteError::Invalid {
            name: name.to_owned(),
            at,
            message,
        };
        let route = syntax::parse(text).map_err(|e| invalid(e.at, e.message))?;
        if let Some(condition) = &route.condition {
            condition::check(condition).map_err(|e| invalid(e.at, e.message))?;
        }
        let mut source = format!("/{}", route.source.join("/"));
        while source.ends_with('*') || source.ends_with('/') {
            source.pop();
        }
        source.push('/');
        Ok(CompiledRoute {
            name: name.to_owned(),
            source_prefix: source.to_lowercase(),
            condition: route.condition,
            sink: route.sink,
            priority: priority.unwrap_or(PRIORITY_DEFAULT),
            time_to_live_secs: time_to_live_secs.filter(|ttl| *ttl > 0),
        })
    }

    /// Whether a message from `source` (`/messages/modules/m/outputs/o`, `/messages`, …) that
    /// `message` shows takes this route: its source starts with the route's (without case),
    /// and its condition, if any, is true.
    #[must_use]
    pub fn matches(&self, source: &str, message: &dyn MessageView) -> bool {
        self.matches_lowered(&lowered_source(source), message)
    }

    /// [`CompiledRoute::matches`] with the source already as `lowered_source` makes it, so a
    /// table of routes lowers it once per message.
    #[must_use]
    pub fn matches_lowered(&self, source: &str, message: &dyn MessageView) -> bool {
        source.starts_with(&self.source_prefix)
            && self
                .condition
                .as_ref()
                .is_none_or(|condition| condition::holds(condition, message))
    }
}

/// A message's source as route sources are matched against it: lower case, with a trailing
/// `/` (so `/messages/modules/a` does not take `/messages/modules/ab`'s routes).
#[must_use]
pub fn lowered_source(source: &str) -> String {
    let mut lowered = if source.is_ascii() {
        // Every message's source is lowered: no per-character Unicode walk when none is needed.
        let mut lowered = String::with_capacity(source.len() + 1);
        lowered.push_str(source);
        lowered.make_ascii_lowercase();
        lowered
    } else {
        source.to_lowercase()
    };
    lowered.push('/');
    lowered
}

#[cfg(test)]
mod tests {
    use super::*;
    use condition::Value;
    use proptest::prelude::*;
    use std::collections::HashMap;

    /// A message as conditions see it.
    #[derive(Default)]
    struct TestMessage {
        app: HashMap<String, String>,
        system: HashMap<String, String>,
        body: Option<serde_json::Value>,
    }

    impl MessageView for TestMessage {
        fn app_property(&self, name: &str) -> Option<&str> {
            self.app.get(name).map(String::as_str)
        }
        fn system_property(&self, name: &str) -> Option<&str> {
            self.system.get(name).map(String::as_str)
        }
        fn json_body(&self) -> Option<&serde_json::Value> {
            self.body.as_ref()
        }
    }

    fn message(app: &[(&str, &str)], system: &[(&str, &str)], body: &str) -> TestMessage {
        let owned = |pairs: &[(&str, &str)]| {
            pairs
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect()
        };
        TestMessage {
            app: owned(app),
            system: owned(system),
            body: serde_json::from_str(body).ok(),
        }
    }

    fn route(text: &str) -> CompiledRoute {
        CompiledRoute::compile("r", text, None, None).unwrap_or_else(|e| panic!("{text}: {e}"))
    }

    fn eval(condition: &str, message: &TestMessage) -> Value {
        let text = format!("FROM /* WHERE {condition} INTO $upstream");
        let parsed = syntax::parse(&text).unwrap_or_else(|e| panic!("{condition}: {e}"));
        let condition_expr = parsed.condition.expect("a condition");
        condition::check(&condition_expr).unwrap_or_else(|e| panic!("{condition}: {e}"));
        condition::evaluate(&condition_expr, message)
    }

    /// Goal: the contract's example routes compile, with their sinks.
    #[test]
    fn the_contract_examples_compile() {
        let alerts = route(
            r#"FROM /messages/modules/filter/outputs/alerts WHERE $body.severity = 'high' INTO BrokeredEndpoint("/modules/notify/inputs/in")"#,
        );
        assert_eq!(
            alerts.sink,
            Sink::ModuleInput {
                module: "notify".into(),
                input: "in".into()
            }
        );
        let sensor = route(
            "FROM /messages/modules/sensor/* WHERE as_number(temp) > 30 AND $contentType = 'application/json' INTO $upstream",
        );
        assert_eq!(sensor.sink, Sink::Upstream);
        route("FROM /messages/* WHERE NOT IS_DEFINED($connectionModuleId) INTO $upstream");
        route("select * from /messages /* keywords in any case */ into $UPSTREAM");
    }

    /// Goal: names are read as edgeHub's lexer reads them, longest first: `-`, `*` and digits
    /// belong to names (`opc-publisher`, `1cam`, `device-type`), operators stand apart.
    #[test]
    fn names_are_read_as_edgehubs_lexer_reads_them() {
        let none = TestMessage::default();
        let hyphen = route("FROM /messages/modules/opc-publisher/outputs/* INTO $upstream");
        assert!(hyphen.matches("/messages/modules/opc-publisher/outputs/o", &none));
        assert!(
            route("FROM /messages/modules/1cam/* INTO $upstream")
                .matches("/messages/modules/1cam", &none)
        );
        let m = message(
            &[("device-type", "x")],
            &[],
            r#"{"temp-c": 21, "a": [{"b": 2}]}"#,
        );
        assert_eq!(eval("device-type = 'x'", &m), Value::Bool(true));
        assert_eq!(eval("$body.temp-c = 21", &m), Value::Bool(true));
        assert_eq!(eval("$BODY.a[0].b = 2", &m), Value::Bool(true));
        assert_eq!(eval("$body.a[0].b - 1 = 1", &m), Value::Bool(true));
        assert_eq!(eval("3 - -2 = 5", &m), Value::Bool(true));
        assert_eq!(
            eval("é = 'x'", &m),
            Value::Undefined,
            "a name of any letters"
        );
    }

    /// Goal: sources match as edgeHub's do: a case-insensitive prefix, the trailing `*`
    /// trimmed (so a partial wildcard is a literal).
    #[test]
    fn sources_match_as_prefixes() {
        let none = TestMessage::default();
        let all_messages = route("FROM /messages/* INTO $upstream");
        assert!(all_messages.matches("/messages/modules/a/outputs/o", &none));
        assert!(all_messages.matches("/messages", &none));
        assert!(!all_messages.matches("/twinChangeNotifications", &none));
        assert!(route("FROM /* INTO $upstream").matches("/twinChangeNotifications", &none));
        let module = route("FROM /messages/modules/A/* INTO $upstream");
        assert!(module.matches("/messages/modules/a", &none));
        assert!(module.matches("/messages/modules/a/outputs/x", &none));
        assert!(!module.matches("/messages/modules/ab", &none));
        let outputs = route("FROM /messages/modules/a/outputs/* INTO $upstream");
        assert!(!outputs.matches("/messages/modules/a", &none));
        let partial = route("FROM /messages/modules/a/outputs/out* INTO $upstream");
        assert!(partial.matches("/messages/modules/a/outputs/out", &none));
        assert!(!partial.matches("/messages/modules/a/outputs/out2", &none));
    }

    /// Goal: three-valued logic: undefined is neither true nor false, and only true routes.
    #[test]
    fn conditions_use_three_valued_logic() {
        let m = message(&[("k", "v")], &[], "");
        for (condition, expected) in [
            ("missing = 'v'", Value::Undefined),
            ("NOT (missing = 'v')", Value::Undefined),
            ("missing = 'v' AND false", Value::Bool(false)),
            ("false AND missing = 'v'", Value::Bool(false)),
            ("missing = 'v' OR true", Value::Bool(true)),
            ("missing = 'v' OR false", Value::Undefined),
            ("k = 'v'", Value::Bool(true)),
            ("k <> 'v'", Value::Bool(false)),
            ("(missing ?? 'x') = 'x'", Value::Bool(true)),
            ("(k ?? 'x') = 'v'", Value::Bool(true)),
            ("missing ?? 'x' = 'x'", Value::Bool(true)), // ?? binds loosest: missing ?? ('x' = 'x')
            ("$body.n = 'x'", Value::Undefined),
            ("is_defined(missing)", Value::Bool(false)),
            ("undefined = undefined", Value::Undefined),
        ] {
            assert_eq!(eval(condition, &m), expected, "{condition}");
        }
    }

    /// Goal: properties resolve as edgeHub resolves them: bare names are application
    /// properties; `$name` an application property named so, else the system property;
    /// `{$name}` the system property only.
    #[test]
    fn properties_resolve_by_scope() {
        let m = message(
            &[("$contentType", "app"), ("temp", "31.5")],
            &[
                ("contentType", "application/json"),
                ("connectionModuleId", "filter"),
            ],
            "",
        );
        assert_eq!(eval("$contentType = 'app'", &m), Value::Bool(true));
        assert_eq!(
            eval("{$contentType} = 'application/json'", &m),
            Value::Bool(true)
        );
        assert_eq!(
            eval("$connectionModuleId = 'filter'", &m),
            Value::Bool(true)
        );
        assert_eq!(eval("as_number(temp) > 30", &m), Value::Bool(true));
        assert_eq!(eval("as_number(temp) + 1 = 32.5", &m), Value::Bool(true));
    }

    /// Goal: `$body` queries read a JSON body; objects, arrays and missing paths are
    /// undefined, and a body that is not JSON makes every query undefined.
    #[test]
    fn body_queries_read_json() {
        let m = message(
            &[],
            &[],
            r#"{"severity":"high","a":{"b":[10,{"c":true}]},"n":null}"#,
        );
        assert_eq!(eval("$body.severity = 'high'", &m), Value::Bool(true));
        assert_eq!(eval("$body.a.b[0] > 5", &m), Value::Bool(true));
        assert_eq!(eval("$body.a.b[1].c", &m), Value::Bool(true));
        assert_eq!(eval("is_null($body.n)", &m), Value::Bool(true));
        assert_eq!(eval("$body.a = 'x'", &m), Value::Undefined);
        assert_eq!(eval("$body.nope = 'x'", &m), Value::Undefined);
        assert_eq!(
            eval("$body.severity > 3", &m),
            Value::Undefined,
            "typed when run"
        );
        let not_json = message(&[], &[], "not json");
        assert_eq!(eval("$body.severity = 'high'", &not_json), Value::Undefined);
    }

    /// Goal: every builtin computes what edgeHub's does.
    #[test]
    fn builtins_compute() {
        let m = message(&[("s", "Hello")], &[], "");
        for condition in [
            "abs(-2) = 2",
            "exp(0) = 1",
            "power(2, 10) = 1024",
            "square(3) = 9",
            "ceiling(1.2) = 2",
            "floor(1.8) = 1",
            "sign(-4) = -1",
            "sqrt(16) = 4",
            "as_number(' 12.5 ') = 12.5",
            "NOT is_defined(as_number('twelve'))",
            "is_string(s)",
            "is_number(1)",
            "is_bool(true)",
            "NOT is_null(s)",
            "length(s) = 5",
            "lower(s) = 'hello'",
            "upper(s) = 'HELLO'",
            "concat(s, ' ', 'world') = 'Hello world'",
            "s || '!' = 'Hello!'",
            "substring(s, 1, 3) = 'ell'",
            "substring(s, 2) = 'llo'",
            "index_of(s, 'l') = 2",
            "index_of(s, 'z') = -1",
            "starts_with(s, 'He')",
            "ends_with(s, 'lo')",
            "contains(s, 'ell')",
            "10 % 4 = 2",
            "-(3) = 0 - 3",
            "0x1F = 31",
            "1.5e2 = 150",
        ] {
            assert_eq!(eval(condition, &m), Value::Bool(true), "{condition}");
        }
        assert_eq!(eval("substring(s, 4, 9) = 'o'", &m), Value::Undefined);
        let huge = message(&[("p", "1e20")], &[], "");
        assert_eq!(
            eval("substring('abc', as_number(p), 1) = 'a'", &huge),
            Value::Undefined
        );
        let twin = message(&[], &[], r#"{"properties":{"reported":{"x":1}}}"#);
        assert_eq!(
            eval("twin_change_includes('properties.reported.x')", &twin),
            Value::Bool(true)
        );
        assert_eq!(
            eval("twin_change_includes('properties.desired')", &twin),
            Value::Bool(false)
        );
    }

    /// Goal: bad routes are refused with the route's name and the position of what is wrong;
    /// properties are strings, so comparing one with a number does not compile.
    #[test]
    fn bad_routes_are_refused_with_a_position() {
        for (text, at) in [
            ("FROM /messages/* WHERE temp > 30 INTO $upstream", 30),
            ("FROM /messages/* WHERE nope(temp) INTO $upstream", 23),
            ("FROM /messages/* WHERE 1 + 'a' = 2 INTO $upstream", 27),
            ("FROM /messages/* WHERE temp = 'x' INTO", 38),
            ("FROM /messages/* INTO BrokeredEndpoint(\"/modules/m\")", 22),
            ("FROM messages INTO $upstream", 5),
            ("FROM /messages/* WHERE 'unterminated INTO $upstream", 23),
            ("FROM /messages/* INTO Elsewhere(\"x\")", 22),
            ("FROM /messages/* WHERE length(1) = 1 INTO $upstream", 30),
            ("FROM /messages/* WHERE 'a' INTO $upstream", 23),
        ] {
            match CompiledRoute::compile("bad", text, None, None) {
                Err(RouteError::Invalid {
                    name, at: found, ..
                }) => {
                    assert_eq!((name.as_str(), found), ("bad", at), "{text}");
                }
                other => panic!("{text}: {other:?}"),
            }
        }
        assert!(matches!(
            CompiledRoute::compile("a.b", "FROM /* INTO $upstream", None, None),
            Err(RouteError::BadName(_))
        ));
        assert!(matches!(
            CompiledRoute::compile("r", "FROM /* INTO $upstream", Some(10), None),
            Err(RouteError::BadPriority { .. })
        ));
    }

    proptest! {
        /// Goal: any text (multi-byte characters included) parses and checks or is refused
        /// with a position inside it; none panics, and a compiled route evaluates against any
        /// property value and body without panicking.
        #[test]
        fn arbitrary_routes_never_panic(
            text in "[ -~éß€😀]{0,80}",
            value in "[ -~é]{0,12}",
            body in r#"\{"a": (1e30|-1|"x"|\[1,2\]|null)\}"#,
        ) {
            let routed = format!("FROM /messages/* WHERE {text} INTO $upstream");
            match CompiledRoute::compile("r", &routed, None, None) {
                Ok(route) => {
                    let app: Vec<(&str, &str)> = vec![("a", value.as_str()), ("s", "é1")];
                    let _ = route.matches("/messages", &message(&app, &[], &body));
                }
                Err(RouteError::Invalid { at, .. }) => prop_assert!(at <= routed.len()),
                Err(other) => prop_assert!(false, "{other}"),
            }
        }
    }
}
