//! WHERE conditions (edgehub-contract.md §3.2): checked for types when a route is compiled, and
//! evaluated with three-valued logic against a message.
//!
//! Properties are strings, so `temp > 30` does not compile (`as_number(temp) > 30` does); a
//! `$body` query is typed when it runs. Anything that cannot be known (a missing property, a
//! body that is not JSON, operands of the wrong type at run time) is `Undefined`, which no
//! comparison turns into true: a route fires only when its condition is `true`.

use super::syntax::{BinaryOp, Expr, ExprKind, PathItem, PropertyScope, UnaryOp};

/// A value while a condition is evaluated.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Bool(bool),
    Number(f64),
    String(String),
    Null,
    Undefined,
}

/// What a condition reads of a message.
pub trait MessageView {
    /// An application property.
    fn app_property(&self, name: &str) -> Option<&str>;
    /// A system property, by edgeHub's name (`connectionDeviceId`, `contentType`, …).
    fn system_property(&self, name: &str) -> Option<&str>;
    /// The body as JSON, when its content type is `application/json` and its encoding UTF-8,
    /// -16 or -32; `None` otherwise.
    fn json_body(&self) -> Option<&serde_json::Value>;
}

/// A type, as the compiler knows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Type {
    Bool,
    Number,
    String,
    Null,
    Undefined,
    /// Known only when it runs (`$body` queries).
    Dynamic,
}

/// A condition that does not type-check: what, and where.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("at {at}: {message}")]
pub struct TypeError {
    pub at: usize,
    pub message: String,
}

/// Checks a condition's types; it must be a boolean.
///
/// # Errors
/// The first operand, argument or function that does not fit.
pub fn check(expr: &Expr) -> Result<(), TypeError> {
    match type_of(expr)? {
        Type::Bool | Type::Dynamic | Type::Undefined => Ok(()),
        other => Err(TypeError {
            at: expr.at,
            message: format!("a condition is true or false, not a {}", name(other)),
        }),
    }
}

fn name(t: Type) -> &'static str {
    match t {
        Type::Bool => "boolean",
        Type::Number => "number",
        Type::String => "string",
        Type::Null => "null",
        Type::Undefined => "undefined",
        Type::Dynamic => "value",
    }
}

fn fits(t: Type, wanted: Type) -> bool {
    t == wanted || matches!(t, Type::Dynamic | Type::Undefined)
}

fn type_error<T>(at: usize, message: String) -> Result<T, TypeError> {
    Err(TypeError { at, message })
}

fn type_of(expr: &Expr) -> Result<Type, TypeError> {
    Ok(match &expr.kind {
        ExprKind::Bool(_) => Type::Bool,
        ExprKind::Number(_) => Type::Number,
        ExprKind::String(_) | ExprKind::Property { .. } => Type::String,
        ExprKind::Null => Type::Null,
        ExprKind::Undefined => Type::Undefined,
        ExprKind::Body(_) => Type::Dynamic,
        ExprKind::Unary { op, operand } => {
            let (wanted, what) = match op {
                UnaryOp::Negate => (Type::Number, "'-'"),
                UnaryOp::Not => (Type::Bool, "NOT"),
            };
            let t = type_of(operand)?;
            if !fits(t, wanted) {
                return type_error(
                    operand.at,
                    format!("{what} takes a {}, not a {}", name(wanted), name(t)),
                );
            }
            wanted
        }
        ExprKind::Binary { op, left, right } => binary_type(*op, left, right)?,
        ExprKind::Call { function, args } => call_type(expr.at, function, args)?,
    })
}

/// A binary operation's type: both operands must fit the operator.
fn binary_type(op: BinaryOp, left: &Expr, right: &Expr) -> Result<Type, TypeError> {
    let (l, r) = (type_of(left)?, type_of(right)?);
    let both = |wanted: Type, what: &str| -> Result<(), TypeError> {
        for (t, side) in [(l, left), (r, right)] {
            if !fits(t, wanted) {
                return type_error(
                    side.at,
                    format!(
                        "invalid operands: {what} takes {}s, not a {}",
                        name(wanted),
                        name(t)
                    ),
                );
            }
        }
        Ok(())
    };
    Ok(match op {
        BinaryOp::Coalesce => {
            if l == r {
                l
            } else {
                Type::Dynamic
            }
        }
        BinaryOp::Or | BinaryOp::And => {
            both(Type::Bool, "AND and OR")?;
            Type::Bool
        }
        BinaryOp::Add
        | BinaryOp::Subtract
        | BinaryOp::Multiply
        | BinaryOp::Divide
        | BinaryOp::Modulo => {
            both(Type::Number, "arithmetic")?;
            Type::Number
        }
        BinaryOp::Concat => {
            both(Type::String, "'||'")?;
            Type::String
        }
        BinaryOp::Equal
        | BinaryOp::NotEqual
        | BinaryOp::Less
        | BinaryOp::LessOrEqual
        | BinaryOp::Greater
        | BinaryOp::GreaterOrEqual => {
            let loose = |t| matches!(t, Type::Dynamic | Type::Undefined | Type::Null);
            let ordered = !matches!(op, BinaryOp::Equal | BinaryOp::NotEqual);
            if !(l == r || loose(l) || loose(r)) || (ordered && l == Type::Bool) {
                return type_error(
                    right.at,
                    format!(
                        "invalid operands: a {} cannot be compared with a {} (convert \
                         properties with as_number)",
                        name(l),
                        name(r)
                    ),
                );
            }
            Type::Bool
        }
    })
}

/// The builtins' signatures: argument types and result.
fn call_type(at: usize, function: &str, args: &[Expr]) -> Result<Type, TypeError> {
    use Type::{Bool, Dynamic, Number, String};
    let (params, result): (&[Type], Type) = match function {
        "abs" | "exp" | "ceiling" | "floor" | "sign" | "sqrt" | "square" => (&[Number], Number),
        "power" => (&[Number, Number], Number),
        "as_number" => (&[Dynamic], Number),
        "is_bool" | "is_defined" | "is_null" | "is_number" | "is_string" => (&[Dynamic], Bool),
        "length" => (&[String], Number),
        "lower" | "upper" => (&[String], String),
        "index_of" => (&[String, String], Number),
        "starts_with" | "ends_with" | "contains" => (&[String, String], Bool),
        "substring" if args.len() == 2 => (&[String, Number], String),
        "substring" => (&[String, Number, Number], String),
        "concat" if args.len() >= 2 => {
            for arg in args {
                let t = type_of(arg)?;
                if !fits(t, String) {
                    return Err(TypeError {
                        at: arg.at,
                        message: format!("concat takes strings, not a {}", name(t)),
                    });
                }
            }
            return Ok(String);
        }
        "concat" => (&[String, String], String),
        "twin_change_includes" => (&[String], Bool),
        other => {
            return Err(TypeError {
                at,
                message: format!("unknown function {other}"),
            });
        }
    };
    if args.len() != params.len() {
        return Err(TypeError {
            at,
            message: format!(
                "{function} takes {} argument(s), not {}",
                params.len(),
                args.len()
            ),
        });
    }
    for (arg, &wanted) in args.iter().zip(params) {
        let t = type_of(arg)?;
        if wanted != Dynamic && !fits(t, wanted) {
            return Err(TypeError {
                at: arg.at,
                message: format!("{function} takes a {}, not a {}", name(wanted), name(t)),
            });
        }
    }
    Ok(result)
}

/// Evaluates a checked condition against a message.
pub fn evaluate(expr: &Expr, message: &dyn MessageView) -> Value {
    match &expr.kind {
        ExprKind::Bool(b) => Value::Bool(*b),
        ExprKind::Number(n) => Value::Number(*n),
        ExprKind::String(s) => Value::String(s.clone()),
        ExprKind::Null => Value::Null,
        ExprKind::Undefined => Value::Undefined,
        ExprKind::Property { name, scope } => property(message, name, *scope),
        ExprKind::Body(path) => body(message, path),
        ExprKind::Unary { op, operand } => match (op, evaluate(operand, message)) {
            (UnaryOp::Negate, Value::Number(n)) => Value::Number(-n),
            (UnaryOp::Not, Value::Bool(b)) => Value::Bool(!b),
            _ => Value::Undefined,
        },
        ExprKind::Binary { op, left, right } => binary(*op, left, right, message),
        ExprKind::Call { function, args } => {
            let args: Vec<Value> = args.iter().map(|a| evaluate(a, message)).collect();
            call(function, &args, message)
        }
    }
}

/// Whether a condition lets a message through: only when it is `true`.
pub fn holds(expr: &Expr, message: &dyn MessageView) -> bool {
    evaluate(expr, message) == Value::Bool(true)
}

fn property(message: &dyn MessageView, name: &str, scope: PropertyScope) -> Value {
    let found = match scope {
        PropertyScope::Application => message.app_property(name),
        PropertyScope::ApplicationThenSystem => message
            .app_property(&format!("${name}"))
            .or_else(|| message.system_property(name)),
        PropertyScope::System => message.system_property(name),
    };
    found.map_or(Value::Undefined, |v| Value::String(v.to_owned()))
}

fn body(message: &dyn MessageView, path: &[PathItem]) -> Value {
    let Some(mut json) = message.json_body() else {
        return Value::Undefined;
    };
    for item in path {
        let next = match item {
            PathItem::Field(field) => json.get(field),
            PathItem::Index(index) => json.get(index),
        };
        let Some(next) = next else {
            return Value::Undefined;
        };
        json = next;
    }
    match json {
        serde_json::Value::Bool(b) => Value::Bool(*b),
        serde_json::Value::Number(n) => n.as_f64().map_or(Value::Undefined, Value::Number),
        serde_json::Value::String(s) => Value::String(s.clone()),
        serde_json::Value::Null => Value::Null,
        // Objects and arrays are not values a condition can use.
        serde_json::Value::Array(_) | serde_json::Value::Object(_) => Value::Undefined,
    }
}

fn binary(op: BinaryOp, left: &Expr, right: &Expr, message: &dyn MessageView) -> Value {
    use Value::{Bool, Number, Undefined};
    let l = evaluate(left, message);
    // AND and OR are three-valued: false AND undefined is false, true OR undefined is true.
    match (op, &l) {
        (BinaryOp::And, Bool(false)) => return Bool(false),
        (BinaryOp::Or, Bool(true)) => return Bool(true),
        (BinaryOp::Coalesce, value) if *value != Undefined => return l,
        _ => {}
    }
    let r = evaluate(right, message);
    match op {
        BinaryOp::Coalesce => r,
        BinaryOp::And | BinaryOp::Or => match (&l, &r) {
            (Bool(_), Bool(b)) => Bool(*b),
            (_, Bool(false)) if op == BinaryOp::And => Bool(false),
            (_, Bool(true)) if op == BinaryOp::Or => Bool(true),
            _ => Undefined,
        },
        BinaryOp::Add
        | BinaryOp::Subtract
        | BinaryOp::Multiply
        | BinaryOp::Divide
        | BinaryOp::Modulo => match (l, r) {
            (Number(a), Number(b)) => Number(match op {
                BinaryOp::Add => a + b,
                BinaryOp::Subtract => a - b,
                BinaryOp::Multiply => a * b,
                BinaryOp::Divide => a / b,
                _ => a % b,
            }),
            _ => Undefined,
        },
        BinaryOp::Concat => match (l, r) {
            (Value::String(a), Value::String(b)) => Value::String(a + &b),
            _ => Undefined,
        },
        BinaryOp::Equal | BinaryOp::NotEqual => match (&l, &r) {
            (Undefined, _) | (_, Undefined) => Undefined,
            // Values of different types (a `$body` number and a string, say) are not
            // comparable, as for the ordering operators; null compares with anything.
            (a, b)
                if std::mem::discriminant(a) != std::mem::discriminant(b)
                    && !matches!(a, Value::Null)
                    && !matches!(b, Value::Null) =>
            {
                Undefined
            }
            _ => Bool((l == r) == (op == BinaryOp::Equal)),
        },
        _ => {
            let ordering = match (&l, &r) {
                (Number(a), Number(b)) => a.partial_cmp(b),
                (Value::String(a), Value::String(b)) => Some(a.cmp(b)),
                _ => None,
            };
            let Some(ordering) = ordering else {
                return Undefined;
            };
            Bool(match op {
                BinaryOp::Less => ordering.is_lt(),
                BinaryOp::LessOrEqual => ordering.is_le(),
                BinaryOp::Greater => ordering.is_gt(),
                _ => ordering.is_ge(),
            })
        }
    }
}

fn call(function: &str, args: &[Value], message: &dyn MessageView) -> Value {
    use Value::{Bool, Number, String as Str, Undefined};
    let number = |f: fn(f64) -> f64| match args.first() {
        Some(Number(n)) => Number(f(*n)),
        _ => Undefined,
    };
    match function {
        "abs" => number(f64::abs),
        "exp" => number(f64::exp),
        "ceiling" => number(f64::ceil),
        "floor" => number(f64::floor),
        "sign" => number(|n| if n == 0.0 { 0.0 } else { n.signum() }),
        "sqrt" => number(f64::sqrt),
        "square" => number(|n| n * n),
        "power" => match args {
            [Number(a), Number(b)] => Number(a.powf(*b)),
            _ => Undefined,
        },
        "as_number" => match args.first() {
            Some(Number(n)) => Number(*n),
            Some(Str(s)) => s.trim().parse::<f64>().map_or(Undefined, Number),
            _ => Undefined,
        },
        "is_bool" => Bool(matches!(args.first(), Some(Bool(_)))),
        "is_defined" => Bool(!matches!(args.first(), Some(Undefined) | None)),
        "is_null" => Bool(matches!(args.first(), Some(Value::Null))),
        "is_number" => Bool(matches!(args.first(), Some(Number(_)))),
        "is_string" => Bool(matches!(args.first(), Some(Str(_)))),
        "length" | "lower" | "upper" | "index_of" | "starts_with" | "ends_with" | "contains"
        | "concat" => string_call(function, args),
        "substring" => substring(args),
        "twin_change_includes" => match args.first() {
            Some(Str(path)) => Bool(twin_change_includes(message, path)),
            _ => Undefined,
        },
        _ => Undefined,
    }
}

/// The string builtins.
fn string_call(function: &str, args: &[Value]) -> Value {
    use Value::{Bool, Number, String as Str, Undefined};
    let strings = |f: &dyn Fn(&str, &str) -> Value| match args {
        [Str(a), Str(b)] => f(a, b),
        _ => Undefined,
    };
    match function {
        #[allow(clippy::cast_precision_loss)] // lengths far below 2^52
        "length" => match args.first() {
            Some(Str(s)) => Number(s.chars().count() as f64),
            _ => Undefined,
        },
        "lower" | "upper" => match args.first() {
            Some(Str(s)) if function == "lower" => Str(s.to_lowercase()),
            Some(Str(s)) => Str(s.to_uppercase()),
            _ => Undefined,
        },
        "index_of" => strings(&|a, b| {
            #[allow(clippy::cast_precision_loss)]
            let found = a.find(b).map_or(-1.0, |i| a[..i].chars().count() as f64);
            Number(found)
        }),
        "starts_with" => strings(&|a, b| Bool(a.starts_with(b))),
        "ends_with" => strings(&|a, b| Bool(a.ends_with(b))),
        "contains" => strings(&|a, b| Bool(a.contains(b))),
        "concat" => {
            let mut out = String::new();
            for arg in args {
                let Str(s) = arg else { return Undefined };
                out.push_str(s);
            }
            Str(out)
        }
        _ => Undefined,
    }
}

/// Whether a twin change notification's body has the dotted `path`
/// (`properties.reported.x`).
fn twin_change_includes(message: &dyn MessageView, path: &str) -> bool {
    let Some(mut json) = message.json_body() else {
        return false;
    };
    for field in path.split('.') {
        let Some(next) = json.get(field) else {
            return false;
        };
        json = next;
    }
    true
}

/// `substring(s, start[, length])`, in characters; out of range is undefined.
fn substring(args: &[Value]) -> Value {
    let index = |value: &Value| match value {
        Value::Number(n) if n.fract() == 0.0 && *n >= 0.0 => {
            #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)] // checked
            Some(*n as usize)
        }
        _ => None,
    };
    let (Some(Value::String(s)), Some(start)) = (args.first(), args.get(1).and_then(index)) else {
        return Value::Undefined;
    };
    let chars: Vec<char> = s.chars().collect();
    let length = match args.get(2) {
        Some(length) => index(length),
        None => chars.len().checked_sub(start),
    };
    match length.and_then(|length| start.checked_add(length)) {
        Some(end) if end <= chars.len() => Value::String(chars[start..end].iter().collect()),
        _ => Value::Undefined,
    }
}
