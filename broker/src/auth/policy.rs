//! Authorization policies: who may connect, and who may publish and subscribe on topics other
//! than IoT Hub's, in the form of edgeHub 1.2's `mqttBroker.authorizations` (a deployment's
//! `$edgeHub` desired properties, schema 1.2 and later):
//!
//! ```json
//! "mqttBroker": { "authorizations": [
//!   { "identities": ["{{iot:identity}}"],
//!     "allow": [{ "operations": ["mqtt:publish", "mqtt:subscribe"], "resources": ["alerts/#"] }],
//!     "deny":  [{ "operations": ["mqtt:subscribe"], "resources": ["alerts/secret"] }] }
//! ] }
//! ```
//!
//! How a request is decided:
//! - Statements are read in order, and the first that names the client, the operation and the
//!   resource decides. Within one entry, its `deny` statements come before its `allow` ones, so
//!   a deny wins a conflict, as edgeHub documents.
//! - An identity is written `device` or `device/module`; a plain MQTT client (no identity) is
//!   named by its client id. Variables: `{{iot:identity}}`, `{{iot:device_id}}`,
//!   `{{iot:module_id}}` (the client's identity, so none of them names a plain client),
//!   `{{mqtt:client_id}}` and `{{iot:this_device_id}}` (the edge device). In an allow's
//!   resource, a value that holds `+` or `#` (or a client id that holds `/`) names nothing: a
//!   client cannot widen a grant by its choice of client id. Identities compare exactly, and a
//!   deny's resource takes values as they are, so no choice of client id escapes a deny.
//! - Resources are topic filters. A publish is named when its topic matches one. A
//!   subscription is allowed only by a resource that takes in every topic its filter could
//!   match, and denied by one that matches its filter read as a topic name (as edgeHub and
//!   mosquitto read it: a deny on `a/b` refuses `a/b`, not `#`). A message is delivered
//!   through a subscription only if the client may subscribe to its very topic
//!   (`Hub::may_receive`), so a wildcard does not reach around a deny.
//! - When no statement decides: a connection is let in (authentication already decided who
//!   may connect; edgeHub 1.2 asked for an explicit `mqtt:connect` grant, which would lock
//!   every module out of a deployment without a policy), an identity may not publish or
//!   subscribe on other topics than its own IoT Hub ones, and a plain client may.
//!
//! IoT Hub topics (`devices/…`, `$iothub/…`) of an identity keep IoT Hub's rules whatever the
//! policy says (`iothub::check_publish`, `iothub::check_subscribe`): a grant to another
//! identity's topics would let one module forge another's telemetry or read its inputs.

use super::identity::IdentityId;
use crate::routing::topic;
use serde_json::Value;

/// What a client asks to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operation {
    Connect,
    Publish,
    Subscribe,
}

impl Operation {
    fn parse(name: &str) -> Option<Operation> {
        match name {
            "mqtt:connect" => Some(Operation::Connect),
            "mqtt:publish" => Some(Operation::Publish),
            "mqtt:subscribe" => Some(Operation::Subscribe),
            _ => None,
        }
    }
}

/// The client a request comes from.
#[derive(Debug, Clone, Copy)]
pub struct Client<'a> {
    pub client_id: &'a str,
    /// The identity it proved; `None` for a plain MQTT client.
    pub identity: Option<&'a IdentityId>,
}

/// A deployment's authorization policy; the default has no statement.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Policy {
    statements: Vec<Statement>,
    /// Whether a statement denies subscriptions, so that delivery has to be checked.
    denies_subscriptions: bool,
    /// `{{iot:this_device_id}}`.
    edge_device: String,
}

/// Why a policy was refused, with where in the manifest.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("mqttBroker.{at}: {why}")]
pub struct PolicyError {
    at: String,
    why: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Statement {
    allow: bool,
    identities: Vec<Template>,
    operations: Vec<Operation>,
    resources: Vec<Template>,
}

/// A policy string that may hold variables.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Template(Vec<Piece>);

#[derive(Debug, Clone, PartialEq, Eq)]
enum Piece {
    Text(String),
    Variable(Variable),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Variable {
    Identity,
    DeviceId,
    ModuleId,
    ClientId,
    ThisDeviceId,
}

impl Variable {
    fn parse(name: &str) -> Option<Variable> {
        match name {
            "iot:identity" => Some(Variable::Identity),
            "iot:device_id" => Some(Variable::DeviceId),
            "iot:module_id" => Some(Variable::ModuleId),
            "mqtt:client_id" => Some(Variable::ClientId),
            "iot:this_device_id" => Some(Variable::ThisDeviceId),
            _ => None,
        }
    }
}

impl Policy {
    /// The policy of a deployment's `$edgeHub` desired properties (`mqttBroker`), for the edge
    /// device `edge_device`; the empty policy when there is none.
    ///
    /// # Errors
    /// What is wrong and where: `mqttBroker` below schema 1.2, an unknown operation or
    /// variable, a resource that is not a topic filter, a statement without resources.
    pub fn from_desired(desired: &Value, edge_device: &str) -> Result<Policy, PolicyError> {
        let fail = |at: &str, why: String| PolicyError {
            at: at.to_owned(),
            why,
        };
        let Some(broker) = desired.get("mqttBroker") else {
            return Ok(Policy::default());
        };
        let version = desired.get("schemaVersion").and_then(Value::as_str);
        if matches!(version, Some("1.0" | "1.1")) {
            return Err(fail("", "needs schemaVersion 1.2 or later".into()));
        }
        if broker.get("bridges").is_some() {
            tracing::warn!(
                "mqttBroker.bridges is not supported yet: the deployment's bridges are ignored"
            );
        }
        let entries = match broker.get("authorizations") {
            None => return Ok(Policy::default()),
            Some(Value::Array(entries)) => entries,
            Some(_) => return Err(fail("authorizations", "is not a list".into())),
        };
        let mut statements = Vec::new();
        for (i, entry) in entries.iter().enumerate() {
            let at = format!("authorizations[{i}]");
            let identities = strings(entry.get("identities"), &format!("{at}.identities"))?
                .iter()
                .map(|(at, text)| Template::parse(text).map_err(|why| fail(at, why)))
                .collect::<Result<Vec<_>, _>>()?;
            if identities.is_empty() {
                return Err(fail(
                    &format!("{at}.identities"),
                    "names no identity".into(),
                ));
            }
            let (deny, allow) = (entry.get("deny"), entry.get("allow"));
            if deny.is_none() && allow.is_none() {
                return Err(fail(&at, "has neither allow nor deny".into()));
            }
            for (effect, allowed) in [("deny", false), ("allow", true)] {
                let at = format!("{at}.{effect}");
                for (j, rule) in listed(entry.get(effect), &at)?.iter().enumerate() {
                    let at = format!("{at}[{j}]");
                    let (operations, resources) = rule_parts(rule, &at)?;
                    statements.push(Statement {
                        allow: allowed,
                        identities: identities.clone(),
                        operations,
                        resources,
                    });
                }
            }
        }
        let denies_subscriptions = statements
            .iter()
            .any(|s| !s.allow && s.operations.contains(&Operation::Subscribe));
        Ok(Policy {
            statements,
            denies_subscriptions,
            edge_device: edge_device.to_owned(),
        })
    }

    /// Whether `client` may connect (authenticated already): unless a statement denies it.
    #[must_use]
    pub fn may_connect(&self, client: &Client<'_>) -> bool {
        self.decide(client, Operation::Connect, "") != Some(false)
    }

    /// Whether `client` may publish on `topic`, which is not one of IoT Hub's.
    #[must_use]
    pub fn may_publish(&self, client: &Client<'_>, topic: &str) -> bool {
        self.decide(client, Operation::Publish, topic)
            .unwrap_or(client.identity.is_none())
    }

    /// Whether `client` may subscribe to `filter`, which is not one of IoT Hub's.
    #[must_use]
    pub fn may_subscribe(&self, client: &Client<'_>, filter: &str) -> bool {
        self.decide(client, Operation::Subscribe, filter)
            .unwrap_or(client.identity.is_none())
    }

    /// Whether a statement denies subscriptions: if none does, a plain client may receive
    /// whatever its subscriptions match.
    #[must_use]
    pub fn denies_subscriptions(&self) -> bool {
        self.denies_subscriptions
    }

    /// The effect of the first statement that names the request; `None` if none does.
    fn decide(&self, client: &Client<'_>, operation: Operation, resource: &str) -> Option<bool> {
        self.statements
            .iter()
            .find(|statement| {
                statement.operations.contains(&operation)
                    && statement
                        .identities
                        .iter()
                        .any(|identity| self.names_client(identity, client))
                    && (operation == Operation::Connect
                        || statement.resources.iter().any(|pattern| {
                            let expanded = self.expand(pattern, client, statement.allow);
                            expanded.is_some_and(|pattern| {
                                names_resource(&pattern, operation, statement.allow, resource)
                            })
                        }))
            })
            .map(|statement| statement.allow)
    }

    /// Whether `identity` (of a statement) names `client`: its identity, or a plain client's
    /// client id.
    fn names_client(&self, identity: &Template, client: &Client<'_>) -> bool {
        // Compared exactly: a value cannot make a name match more clients.
        let Some(name) = self.expand(identity, client, false) else {
            return false;
        };
        match client.identity {
            Some(id) => match (name.split_once('/'), &id.module) {
                (Some((device, module)), Some(ours)) => device == id.device && module == ours,
                (None, None) => name == id.device,
                _ => false,
            },
            None => name == client.client_id,
        }
    }

    /// `template` with its variables replaced by `client`'s values; `None` if one has none, or
    /// (`for_grant`: an allow's resource) one that would widen a topic filter.
    fn expand(&self, template: &Template, client: &Client<'_>, for_grant: bool) -> Option<String> {
        let mut expanded = String::new();
        for piece in &template.0 {
            let value = match piece {
                Piece::Text(text) => {
                    expanded.push_str(text);
                    continue;
                }
                Piece::Variable(Variable::Identity) => client.identity.map(ToString::to_string),
                Piece::Variable(Variable::DeviceId) => client.identity.map(|id| id.device.clone()),
                Piece::Variable(Variable::ModuleId) => {
                    client.identity.and_then(|id| id.module.clone())
                }
                Piece::Variable(Variable::ClientId) => Some(client.client_id.to_owned())
                    .filter(|id| !for_grant || client.identity.is_some() || !id.contains('/')),
                Piece::Variable(Variable::ThisDeviceId) => {
                    Some(self.edge_device.clone()).filter(|device| !device.is_empty())
                }
            }?;
            if value.is_empty() || (for_grant && value.contains(['+', '#'])) {
                return None;
            }
            expanded.push_str(&value);
        }
        Some(expanded)
    }
}

impl Template {
    fn parse(text: &str) -> Result<Template, String> {
        let mut pieces = Vec::new();
        let mut rest = text;
        while let Some(start) = rest.find("{{") {
            if start > 0 {
                pieces.push(Piece::Text(rest[..start].to_owned()));
            }
            let after = &rest[start + 2..];
            let end = after
                .find("}}")
                .ok_or_else(|| format!("{text:?} opens a variable it does not close"))?;
            let name = &after[..end];
            let variable = Variable::parse(name).ok_or_else(|| {
                format!(
                    "{text:?}: unknown variable {{{{{name}}}}} (known: iot:identity, \
                     iot:device_id, iot:module_id, mqtt:client_id, iot:this_device_id)"
                )
            })?;
            pieces.push(Piece::Variable(variable));
            rest = &after[end + 2..];
        }
        if !rest.is_empty() {
            pieces.push(Piece::Text(rest.to_owned()));
        }
        if pieces.is_empty() {
            return Err("is empty".into());
        }
        Ok(Template(pieces))
    }

    /// The template with every variable as one plain level, to check its shape.
    fn sample(&self) -> String {
        self.0
            .iter()
            .map(|piece| match piece {
                Piece::Text(text) => text.as_str(),
                Piece::Variable(_) => "v",
            })
            .collect()
    }
}

/// Whether `pattern` (a statement's resource) names `resource`; see the module documentation.
fn names_resource(pattern: &str, operation: Operation, allow: bool, resource: &str) -> bool {
    match (operation, allow) {
        (Operation::Subscribe, true) => covers(pattern, resource),
        _ => topic::matches(pattern, resource),
    }
}

/// Whether every topic `inner` matches, `outer` matches too (both valid filters).
fn covers(outer: &str, inner: &str) -> bool {
    // A filter that starts with a wildcard matches no `$` topic (MQTT §4.7.2).
    if outer.starts_with(['+', '#']) && inner.starts_with('$') {
        return false;
    }
    let mut inner_levels = inner.split('/');
    for level in outer.split('/') {
        match (level, inner_levels.next()) {
            ("#", _) => return true,
            (_, None | Some("#")) => return false,
            ("+", Some(_)) => {}
            (literal, Some(theirs)) => {
                if literal != theirs {
                    return false;
                }
            }
        }
    }
    inner_levels.next().is_none()
}

/// A list of strings at `at`, each with where it is.
fn strings(value: Option<&Value>, at: &str) -> Result<Vec<(String, String)>, PolicyError> {
    let fail = |why: &str| PolicyError {
        at: at.to_owned(),
        why: why.to_owned(),
    };
    let Some(Value::Array(items)) = value else {
        return Err(fail("is not a list of strings"));
    };
    items
        .iter()
        .enumerate()
        .map(|(i, item)| match item.as_str() {
            Some(text) => Ok((format!("{at}[{i}]"), text.to_owned())),
            None => Err(fail("is not a list of strings")),
        })
        .collect()
}

/// The list at `at`, empty when absent.
fn listed<'a>(value: Option<&'a Value>, at: &str) -> Result<&'a [Value], PolicyError> {
    match value {
        None => Ok(&[]),
        Some(Value::Array(items)) => Ok(items),
        Some(_) => Err(PolicyError {
            at: at.to_owned(),
            why: "is not a list".into(),
        }),
    }
}

/// One allow or deny rule's operations and resources.
fn rule_parts(rule: &Value, at: &str) -> Result<(Vec<Operation>, Vec<Template>), PolicyError> {
    let fail = |at: &str, why: String| PolicyError {
        at: at.to_owned(),
        why,
    };
    let mut operations = Vec::new();
    for (at, name) in strings(rule.get("operations"), &format!("{at}.operations"))? {
        let operation = Operation::parse(&name).ok_or_else(|| {
            let why = format!("{name:?} is not mqtt:connect, mqtt:publish or mqtt:subscribe");
            fail(&at, why)
        })?;
        operations.push(operation);
    }
    if operations.is_empty() {
        return Err(fail(
            &format!("{at}.operations"),
            "names no operation".into(),
        ));
    }
    let resources = match rule.get("resources") {
        None => Vec::new(),
        listed => strings(listed, &format!("{at}.resources"))?
            .into_iter()
            .map(|(at, text)| {
                let template = Template::parse(&text).map_err(|why| fail(&at, why))?;
                topic::validate_filter(&template.sample())
                    .map_err(|e| fail(&at, format!("{text:?} is not a topic filter: {e}")))?;
                Ok(template)
            })
            .collect::<Result<Vec<_>, PolicyError>>()?,
    };
    let on_topics = operations.iter().any(|op| *op != Operation::Connect);
    if on_topics && resources.is_empty() {
        let why = "publish and subscribe need resources (topic filters)".into();
        return Err(fail(at, why));
    }
    Ok((operations, resources))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn policy(authorizations: &str) -> Policy {
        let desired: Value = serde_json::from_str(&format!(
            r#"{{"schemaVersion": "1.2", "mqttBroker": {{"authorizations": {authorizations}}}}}"#
        ))
        .expect("json");
        Policy::from_desired(&desired, "edge").expect("a valid policy")
    }

    fn refused(authorizations: &str) -> String {
        let desired: Value = serde_json::from_str(&format!(
            r#"{{"schemaVersion": "1.2", "mqttBroker": {{"authorizations": {authorizations}}}}}"#
        ))
        .expect("json");
        Policy::from_desired(&desired, "edge")
            .expect_err("refused")
            .to_string()
    }

    fn id(text: &str) -> IdentityId {
        IdentityId::parse(text).expect("an id")
    }

    fn identity(identity: &IdentityId) -> Client<'_> {
        Client {
            client_id: "ignored",
            identity: Some(identity),
        }
    }

    fn plain(client_id: &str) -> Client<'_> {
        Client {
            client_id,
            identity: None,
        }
    }

    /// Goal: the defaults keep today's behaviour when a deployment has no policy: everyone
    /// connects, identities stay on their own IoT Hub topics, plain clients go anywhere.
    #[test]
    fn without_statements_identities_are_refused_other_topics_and_plain_clients_are_not() {
        let empty = Policy::default();
        let module = id("edge/filter");
        assert!(empty.may_connect(&identity(&module)));
        assert!(!empty.may_publish(&identity(&module), "alerts/fire"));
        assert!(!empty.may_subscribe(&identity(&module), "alerts/#"));
        assert!(empty.may_publish(&plain("tool"), "alerts/fire"));
        assert!(empty.may_subscribe(&plain("tool"), "#"));
        assert!(empty.may_connect(&plain("tool")));
    }

    /// Goal: edgeHub's documented example works as written: a rogue client is refused, IoT
    /// identities connect, and one identity publishes alerts while others do not.
    #[test]
    fn edgehubs_documented_policy_decides_as_documented() {
        let policy = policy(
            r#"[
              {"identities": ["rogue_client"], "deny": [{"operations": ["mqtt:connect"]}]},
              {"identities": ["{{iot:identity}}"], "allow": [{"operations": ["mqtt:connect"]}]},
              {"identities": ["sensor_1"],
               "allow": [{"operations": ["mqtt:publish"], "resources": ["events/alerts"]}]}
            ]"#,
        );
        let (sensor, other) = (id("sensor_1"), id("sensor_2"));
        assert!(!policy.may_connect(&plain("rogue_client")));
        assert!(policy.may_connect(&plain("tool")));
        assert!(policy.may_connect(&identity(&sensor)));
        assert!(policy.may_publish(&identity(&sensor), "events/alerts"));
        assert!(!policy.may_publish(&identity(&sensor), "events/other"));
        assert!(!policy.may_publish(&identity(&other), "events/alerts"));
    }

    /// Goal: order decides, and within one entry a deny beats an allow.
    #[test]
    fn the_first_statement_that_names_a_request_decides_and_deny_wins_within_an_entry() {
        let policy = policy(
            r#"[
              {"identities": ["edge/filter"],
               "allow": [{"operations": ["mqtt:publish"], "resources": ["a/#"]}],
               "deny": [{"operations": ["mqtt:publish"], "resources": ["a/secret"]}]},
              {"identities": ["edge/filter"],
               "deny": [{"operations": ["mqtt:publish"], "resources": ["a/open"]}]}
            ]"#,
        );
        let module = id("edge/filter");
        assert!(!policy.may_publish(&identity(&module), "a/secret"));
        assert!(
            policy.may_publish(&identity(&module), "a/open"),
            "an earlier allow"
        );
        assert!(policy.may_publish(&identity(&module), "a/b/c"));
    }

    /// Goal: variables take the client's values, never a plain client's for identity
    /// variables, and a client id cannot widen a grant with wildcards or levels.
    #[test]
    fn variables_name_the_clients_own_values_and_cannot_widen_a_grant() {
        let policy = policy(
            r#"[
              {"identities": ["{{iot:identity}}"],
               "allow": [{"operations": ["mqtt:publish", "mqtt:subscribe"],
                          "resources": ["modules/{{iot:module_id}}/#", "devices-of/{{iot:this_device_id}}/{{iot:device_id}}"]}]},
              {"identities": ["{{mqtt:client_id}}"],
               "deny": [{"operations": ["mqtt:publish"], "resources": ["clients/{{mqtt:client_id}}/locked"]}]}
            ]"#,
        );
        let module = id("edge/filter");
        assert!(policy.may_publish(&identity(&module), "modules/filter/x"));
        assert!(!policy.may_publish(&identity(&module), "modules/sink/x"));
        assert!(policy.may_subscribe(&identity(&module), "devices-of/edge/edge"));
        assert!(!policy.may_publish(&plain("tool"), "clients/tool/locked"));
        assert!(policy.may_publish(&plain("tool"), "clients/other/locked"));
        // No client id escapes the deny that names it.
        assert!(!policy.may_publish(&plain("a/b"), "clients/a/b/locked"));
        let grant = self::policy(
            r#"[{"identities": ["{{mqtt:client_id}}"],
                 "allow": [{"operations": ["mqtt:subscribe"], "resources": ["own/{{mqtt:client_id}}"]}]},
                {"identities": ["{{mqtt:client_id}}"],
                 "deny": [{"operations": ["mqtt:subscribe"], "resources": ["own/#"]}]}]"#,
        );
        // A wildcard in a client id widens no grant: `own/#` is not `own/{client id}`.
        assert!(!grant.may_subscribe(&plain("#"), "own/x"));
        assert!(grant.may_subscribe(&plain("me"), "own/me"));
    }

    /// Goal: a subscription is allowed only inside a grant, and denied when a deny names its
    /// filter; a wildcard subscription a deny does not name is allowed (what it may receive is
    /// checked per message, with the message's topic as the filter).
    #[test]
    fn subscriptions_are_allowed_inside_a_grant_and_a_deny_also_holds_at_delivery() {
        let policy = policy(
            r#"[
              {"identities": ["{{mqtt:client_id}}"],
               "deny": [{"operations": ["mqtt:subscribe"], "resources": ["test/nosubscribe"]}]},
              {"identities": ["edge/filter"],
               "allow": [{"operations": ["mqtt:subscribe"], "resources": ["alerts/+/high"]}]}
            ]"#,
        );
        let tool = plain("myclientid");
        assert!(!policy.may_subscribe(&tool, "test/nosubscribe"));
        assert!(policy.may_subscribe(&tool, "test/#"));
        assert!(policy.may_subscribe(&tool, "#"));
        assert!(policy.may_subscribe(&tool, "test/other"));
        assert!(policy.denies_subscriptions());
        assert!(
            !policy.may_subscribe(&plain("x/y"), "test/nosubscribe"),
            "any client id"
        );
        let module = id("edge/filter");
        assert!(policy.may_subscribe(&identity(&module), "alerts/a/high"));
        assert!(policy.may_subscribe(&identity(&module), "alerts/+/high"));
        assert!(!policy.may_subscribe(&identity(&module), "alerts/#"));
        assert!(!policy.may_subscribe(&identity(&module), "alerts/a/+"));
    }

    /// Goal: a bad policy is refused saying what and where, never half applied.
    #[test]
    fn a_bad_policy_is_refused_with_its_place() {
        let bad_operation =
            refused(r#"[{"identities": ["a"], "allow": [{"operations": ["mqtt:read"]}]}]"#);
        assert!(
            bad_operation.contains("authorizations[0].allow[0].operations[0]"),
            "{bad_operation}"
        );
        let bad_variable = refused(
            r#"[{"identities": ["{{iot:whoever}}"], "allow": [{"operations": ["mqtt:connect"]}]}]"#,
        );
        assert!(bad_variable.contains("unknown variable"), "{bad_variable}");
        let bad_filter = refused(
            r#"[{"identities": ["a"], "allow": [{"operations": ["mqtt:publish"], "resources": ["a/#/b"]}]}]"#,
        );
        assert!(bad_filter.contains("not a topic filter"), "{bad_filter}");
        let no_resources =
            refused(r#"[{"identities": ["a"], "deny": [{"operations": ["mqtt:subscribe"]}]}]"#);
        assert!(no_resources.contains("need resources"), "{no_resources}");
        let old: Value = serde_json::from_str(
            r#"{"schemaVersion": "1.1", "mqttBroker": {"authorizations": []}}"#,
        )
        .expect("json");
        assert!(Policy::from_desired(&old, "edge").is_err());
    }

    fn filter() -> impl Strategy<Value = String> {
        let level = prop_oneof![
            Just("a".to_owned()),
            Just("b".to_owned()),
            Just("+".to_owned()),
            Just("$s".to_owned())
        ];
        (prop::collection::vec(level, 1..4), any::<bool>()).prop_map(|(levels, hash)| {
            let mut filter = levels.join("/");
            if hash {
                filter.push_str("/#");
            }
            filter
        })
    }

    fn name() -> impl Strategy<Value = String> {
        prop::collection::vec(
            prop_oneof![Just("a"), Just("b"), Just("c"), Just("$s")],
            1..5,
        )
        .prop_map(|levels| levels.join("/"))
    }

    proptest! {
        /// Goal: `covers` agrees with topic matching on every topic tried: what an inner
        /// filter matches, an outer one that covers it matches too; and a filter covers itself.
        #[test]
        fn covers_agrees_with_matching(a in filter(), b in filter(), topic in name()) {
            if covers(&a, &b) && topic::matches(&b, &topic) {
                prop_assert!(topic::matches(&a, &topic), "{a} covers {b} but not {topic}");
            }
            prop_assert!(covers(&a, &a), "{a} covers itself");
        }
    }
}
