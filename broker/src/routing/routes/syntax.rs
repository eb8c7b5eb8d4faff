//! The route language's syntax (edgehub-contract.md §3.1–§3.2): a route statement and its
//! WHERE condition, read into a [`Route`] with positions for error messages.
//!
//! ```text
//! route     = [SELECT "*"] FROM source [WHERE condition] INTO sink
//! source    = 1*("/" ("*" | id))
//! sink      = "$upstream" | id "(" string ")"          (BrokeredEndpoint("/modules/m/inputs/i"))
//! condition = coalesce
//! coalesce  = or *("??" or)          or  = and *(OR and)       and = equality *(AND equality)
//! equality  = relation *(("=" | "!=" | "<>") relation)
//! relation  = additive *(("<" | "<=" | ">" | ">=") additive)
//! additive  = multiplicative *(("+" | "-" | "||") multiplicative)
//! multiplicative = unary *(("*" | "/" | "%") unary)
//! unary     = ("-" | NOT) unary | primary
//! primary   = literal | "(" condition ")" | id "(" [condition *("," condition)] ")"
//!           | id | "$" name | "{" "$" name "}" | "$body" 1*("." name | "[" integer "]")
//! ```
//!
//! Keywords are case-insensitive; `true`, `false`, `null` and `undefined` are lower case.
//! Comments are `/* … */` (a `/*` with no `*/` after it is a source's `/*`). Strings take `'…'` or `"…"` with `\'`, `\"`, `\\` and `\uXXXX`.

use std::fmt;

/// A parsed route.
#[derive(Debug, Clone, PartialEq)]
pub struct Route {
    /// The source path's items, `*` included (`/messages/modules/m/*` → messages, modules, m, *).
    pub source: Vec<String>,
    pub condition: Option<Expr>,
    pub sink: Sink,
}

/// Where a route sends messages.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Sink {
    Upstream,
    ModuleInput { module: String, input: String },
}

/// A condition's expression, each node with the offset it starts at.
#[derive(Debug, Clone, PartialEq)]
pub struct Expr {
    pub at: usize,
    pub kind: ExprKind,
}

#[derive(Debug, Clone, PartialEq)]
pub enum ExprKind {
    Bool(bool),
    Number(f64),
    String(String),
    Null,
    Undefined,
    /// `name`: an application property; `$name`: the application property `$name`, else the
    /// system property `name`; `{$name}`: the system property only.
    Property {
        name: String,
        scope: PropertyScope,
    },
    /// `$body.a.b[0]`: a query on a JSON body.
    Body(Vec<PathItem>),
    Call {
        function: String,
        args: Vec<Expr>,
    },
    Unary {
        op: UnaryOp,
        operand: Box<Expr>,
    },
    Binary {
        op: BinaryOp,
        left: Box<Expr>,
        right: Box<Expr>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PropertyScope {
    Application,
    ApplicationThenSystem,
    System,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PathItem {
    Field(String),
    Index(usize),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UnaryOp {
    Negate,
    Not,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BinaryOp {
    Coalesce,
    Or,
    And,
    Equal,
    NotEqual,
    Less,
    LessOrEqual,
    Greater,
    GreaterOrEqual,
    Add,
    Subtract,
    Concat,
    Multiply,
    Divide,
    Modulo,
}

/// Whether a system property's name is a `$body` query (`$body`, `$BODY.x`, `$body[0]`).
fn is_body(name: &str) -> bool {
    name.get(..4)
        .is_some_and(|head| head.eq_ignore_ascii_case("body"))
        && matches!(name.as_bytes().get(4), None | Some(b'.' | b'['))
}

/// A route that does not parse: what was wrong, and where (a byte offset in the route).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("at {at}: {message}")]
pub struct SyntaxError {
    pub at: usize,
    pub message: String,
}

/// Parses a route statement.
///
/// # Errors
/// The first thing that does not fit the grammar, with its position.
pub fn parse(route: &str) -> Result<Route, SyntaxError> {
    let tokens = lex(route)?;
    let mut parser = Parser {
        tokens,
        next: 0,
        end: route.len(),
    };
    parser.route()
}

#[derive(Debug, Clone, PartialEq)]
enum Token {
    /// An identifier or keyword (`*` and `.` are identifier characters, as in edgeHub).
    Id(String),
    /// `$name`.
    SysProp(String),
    String(String),
    /// Its value, and its text (a source path item may be a number).
    Number(f64, String),
    Symbol(&'static str),
}

impl fmt::Display for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Token::Id(id) => write!(f, "{id:?}"),
            Token::SysProp(name) => write!(f, "\"${name}\""),
            Token::String(s) => write!(f, "the string {s:?}"),
            Token::Number(_, text) => write!(f, "the number {text}"),
            Token::Symbol(s) => write!(f, "{s:?}"),
        }
    }
}

const SYMBOLS: [&str; 21] = [
    "??", "<=", ">=", "<>", "!=", "||", "(", ")", "[", "]", "{", "}", ",", "/", "=", "<", ">", "+",
    "-", "%", "*",
];

fn lex(text: &str) -> Result<Vec<(usize, Token)>, SyntaxError> {
    let mut tokens = Vec::new();
    let mut at = 0;
    let error = |at: usize, message: &str| SyntaxError {
        at,
        message: message.to_owned(),
    };
    while at < text.len() {
        let rest = &text[at..];
        let Some(c) = rest.chars().next() else { break };
        if c.is_whitespace() {
            at += c.len_utf8();
            continue;
        }
        if let Some(end) = rest.strip_prefix("/*").and_then(|c| c.find("*/")) {
            // As in edgeHub's ANTLR lexer, `/*` starts a comment only if a `*/` closes it:
            // otherwise it is the `/*` of a source such as `/messages/*`.
            at += 2 + end + 2;
            continue;
        }
        let (token, used) = if c == '"' || c == '\'' {
            let (string, used) = lex_string(rest).map_err(|message| error(at, &message))?;
            (Token::String(string), used)
        } else if c == '$' {
            let name = name_chars(&rest[1..], SYS_PROP_EXCLUDED);
            if name.is_empty() {
                return Err(error(at, "a '$' with no name after it"));
            }
            (Token::SysProp(name.to_owned()), 1 + name.len())
        } else {
            // The longest of a number, a symbol and an identifier, as ANTLR takes it; a tie
            // goes to the number, then the symbol (`30`, `*` and `-` are those, `1cam`,
            // `out*` and `device-type` identifiers). A sign before a digit is an operator.
            let number = starts_number(rest)
                .then(|| lex_number(rest))
                .transpose()
                .map_err(|message| error(at, &message))?;
            let symbol = SYMBOLS.iter().find(|s| rest.starts_with(**s));
            let signed = (c == '-' || c == '+') && starts_number(&rest[1..]);
            let id = if signed {
                ""
            } else {
                name_chars(rest, ID_EXCLUDED)
            };
            let number_len = number.as_ref().map_or(0, |(_, used)| *used);
            let symbol_len = symbol.map_or(0, |s| s.len());
            if number_len > 0 && number_len >= symbol_len.max(id.len()) {
                let (value, used) = number.unwrap_or_default();
                (Token::Number(value, rest[..used].to_owned()), used)
            } else if let Some(symbol) = symbol.filter(|s| s.len() >= id.len()) {
                (Token::Symbol(symbol), symbol.len())
            } else if !id.is_empty() {
                (Token::Id(id.to_owned()), id.len())
            } else {
                return Err(error(at, &format!("unexpected {c:?}")));
            }
        };
        tokens.push((at, token));
        at += used;
    }
    Ok(tokens)
}

/// What ends an identifier in edgeHub's lexer (and white space); `'` too, so strings win.
const ID_EXCLUDED: &str = "()<>@,;:\"'/[]?={}";
/// What ends a system property's name: as an identifier, but `[` and `]` belong to it
/// (`$body.a[0]`).
const SYS_PROP_EXCLUDED: &str = "()<>@,;:\"'/?={}";

/// The longest run at the start of `text` of characters outside `excluded` and white space.
fn name_chars<'a>(text: &'a str, excluded: &str) -> &'a str {
    let end = text
        .find(|c: char| c.is_whitespace() || excluded.contains(c))
        .unwrap_or(text.len());
    &text[..end]
}

fn starts_number(text: &str) -> bool {
    let mut chars = text.chars();
    match chars.next() {
        Some(d) if d.is_ascii_digit() => true,
        Some('.') => chars.next().is_some_and(|d| d.is_ascii_digit()),
        _ => false,
    }
}

fn lex_string(text: &str) -> Result<(String, usize), String> {
    let quote = text.chars().next().unwrap_or('"');
    let mut out = String::new();
    let mut chars = text.char_indices().skip(1);
    while let Some((i, c)) = chars.next() {
        match c {
            c if c == quote => return Ok((out, i + 1)),
            '\\' => match chars.next() {
                Some((_, '\'')) => out.push('\''),
                Some((_, '"')) => out.push('"'),
                Some((_, '\\')) => out.push('\\'),
                Some((_, 'u')) => {
                    let hex: String = chars.by_ref().take(4).map(|(_, c)| c).collect();
                    let code = u32::from_str_radix(&hex, 16)
                        .ok()
                        .filter(|_| hex.len() == 4)
                        .and_then(char::from_u32)
                        .ok_or("a \\u escape needs four hex digits of a character")?;
                    out.push(code);
                }
                _ => return Err("an unknown escape in a string (\\', \\\", \\\\, \\uXXXX)".into()),
            },
            c => out.push(c),
        }
    }
    Err("a string that never ends".into())
}

fn lex_number(text: &str) -> Result<(f64, usize), String> {
    if let Some(hex) = text.strip_prefix("0x").or_else(|| text.strip_prefix("0X")) {
        let digits = hex
            .find(|c: char| !c.is_ascii_hexdigit())
            .unwrap_or(hex.len());
        let value = u64::from_str_radix(&hex[..digits], 16).map_err(|e| e.to_string())?;
        #[allow(clippy::cast_precision_loss)] // as edgeHub: every number is a double
        return Ok((value as f64, 2 + digits));
    }
    let mut end = 0;
    let bytes = text.as_bytes();
    while end < bytes.len() && (bytes[end].is_ascii_digit() || bytes[end] == b'.') {
        end += 1;
    }
    if end < bytes.len() && (bytes[end] == b'e' || bytes[end] == b'E') {
        let mut exponent = end + 1;
        if exponent < bytes.len() && (bytes[exponent] == b'+' || bytes[exponent] == b'-') {
            exponent += 1;
        }
        if exponent < bytes.len() && bytes[exponent].is_ascii_digit() {
            end = exponent;
            while end < bytes.len() && bytes[end].is_ascii_digit() {
                end += 1;
            }
        }
    }
    let value = text[..end]
        .parse::<f64>()
        .map_err(|_| format!("{:?} is not a number", &text[..end]))?;
    Ok((value, end))
}

struct Parser {
    tokens: Vec<(usize, Token)>,
    next: usize,
    /// The route's length: where "the end" is.
    end: usize,
}

impl Parser {
    fn peek(&self) -> Option<&Token> {
        self.tokens.get(self.next).map(|(_, token)| token)
    }

    fn at(&self) -> usize {
        self.tokens.get(self.next).map_or(self.end, |(at, _)| *at)
    }

    fn error<T>(&self, message: impl Into<String>) -> Result<T, SyntaxError> {
        Err(SyntaxError {
            at: self.at(),
            message: message.into(),
        })
    }

    fn unexpected<T>(&self, wanted: &str) -> Result<T, SyntaxError> {
        match self.peek() {
            Some(token) => self.error(format!("expected {wanted}, found {token}")),
            None => self.error(format!("expected {wanted}, found the end")),
        }
    }

    fn keyword(&mut self, keyword: &str) -> bool {
        let found = matches!(self.peek(), Some(Token::Id(id)) if id.eq_ignore_ascii_case(keyword));
        if found {
            self.next += 1;
        }
        found
    }

    fn symbol(&mut self, symbol: &str) -> bool {
        let found = matches!(self.peek(), Some(Token::Symbol(s)) if *s == symbol);
        if found {
            self.next += 1;
        }
        found
    }

    fn expect_symbol(&mut self, symbol: &str) -> Result<(), SyntaxError> {
        if self.symbol(symbol) {
            Ok(())
        } else {
            self.unexpected(&format!("{symbol:?}"))
        }
    }

    fn route(&mut self) -> Result<Route, SyntaxError> {
        if self.keyword("SELECT") {
            self.expect_symbol("*")?;
        }
        if !self.keyword("FROM") {
            return self.unexpected("FROM");
        }
        let source = self.source()?;
        let condition = if self.keyword("WHERE") {
            Some(self.condition()?)
        } else {
            None
        };
        if !self.keyword("INTO") {
            return self.unexpected(if condition.is_some() {
                "INTO"
            } else {
                "WHERE or INTO"
            });
        }
        let sink = self.sink()?;
        if self.peek().is_some() {
            return self.unexpected("the end of the route");
        }
        Ok(Route {
            source,
            condition,
            sink,
        })
    }

    fn source(&mut self) -> Result<Vec<String>, SyntaxError> {
        let mut items = Vec::new();
        while self.symbol("/") {
            match self.peek().cloned() {
                Some(Token::Symbol("*")) => items.push("*".to_owned()),
                Some(Token::Id(id) | Token::Number(_, id)) => items.push(id),
                _ => return self.unexpected("a source path item"),
            }
            self.next += 1;
        }
        if items.is_empty() {
            return self.unexpected("a source such as /messages/*");
        }
        Ok(items)
    }

    fn sink(&mut self) -> Result<Sink, SyntaxError> {
        let at = self.at();
        match self.peek().cloned() {
            Some(Token::SysProp(name)) if name.eq_ignore_ascii_case("upstream") => {
                self.next += 1;
                Ok(Sink::Upstream)
            }
            Some(Token::Id(function)) if function.eq_ignore_ascii_case("BrokeredEndpoint") => {
                self.next += 1;
                self.expect_symbol("(")?;
                let Some(Token::String(address)) = self.peek().cloned() else {
                    return self.unexpected("the endpoint's address in quotes");
                };
                self.next += 1;
                self.expect_symbol(")")?;
                let address = address.trim();
                let address = address.strip_prefix('/').unwrap_or(address);
                let address = address.strip_suffix('/').unwrap_or(address);
                match address.split('/').collect::<Vec<_>>().as_slice() {
                    [modules, module, inputs, input]
                        if modules.eq_ignore_ascii_case("modules")
                            && inputs.eq_ignore_ascii_case("inputs")
                            && !module.is_empty()
                            && !input.is_empty() =>
                    {
                        Ok(Sink::ModuleInput {
                            module: (*module).to_owned(),
                            input: (*input).to_owned(),
                        })
                    }
                    _ => Err(SyntaxError {
                        at,
                        message: format!(
                            "BrokeredEndpoint({address:?}) is not \"/modules/{{module}}/inputs/{{input}}\""
                        ),
                    }),
                }
            }
            _ => self
                .unexpected("$upstream or BrokeredEndpoint(\"/modules/{module}/inputs/{input}\")"),
        }
    }

    fn condition(&mut self) -> Result<Expr, SyntaxError> {
        self.binary(0)
    }

    /// Binary operators by precedence, lowest first.
    fn binary(&mut self, level: usize) -> Result<Expr, SyntaxError> {
        const LEVELS: [&[(&str, BinaryOp)]; 7] = [
            &[("??", BinaryOp::Coalesce)],
            &[("OR", BinaryOp::Or)],
            &[("AND", BinaryOp::And)],
            &[
                ("=", BinaryOp::Equal),
                ("!=", BinaryOp::NotEqual),
                ("<>", BinaryOp::NotEqual),
            ],
            &[
                ("<=", BinaryOp::LessOrEqual),
                (">=", BinaryOp::GreaterOrEqual),
                ("<", BinaryOp::Less),
                (">", BinaryOp::Greater),
            ],
            &[
                ("+", BinaryOp::Add),
                ("-", BinaryOp::Subtract),
                ("||", BinaryOp::Concat),
            ],
            &[
                ("*", BinaryOp::Multiply),
                ("/", BinaryOp::Divide),
                ("%", BinaryOp::Modulo),
            ],
        ];
        let Some(operators) = LEVELS.get(level) else {
            return self.unary();
        };
        let mut left = self.binary(level + 1)?;
        'operators: loop {
            for &(text, op) in *operators {
                let at = self.at();
                let found = if text.chars().all(char::is_alphabetic) {
                    self.keyword(text)
                } else {
                    self.symbol(text)
                };
                if found {
                    let right = self.binary(level + 1)?;
                    left = Expr {
                        at,
                        kind: ExprKind::Binary {
                            op,
                            left: Box::new(left),
                            right: Box::new(right),
                        },
                    };
                    continue 'operators;
                }
            }
            return Ok(left);
        }
    }

    fn unary(&mut self) -> Result<Expr, SyntaxError> {
        let at = self.at();
        let op = if self.symbol("-") {
            UnaryOp::Negate
        } else if self.keyword("NOT") {
            UnaryOp::Not
        } else {
            return self.primary();
        };
        let operand = Box::new(self.unary()?);
        Ok(Expr {
            at,
            kind: ExprKind::Unary { op, operand },
        })
    }

    fn primary(&mut self) -> Result<Expr, SyntaxError> {
        let at = self.at();
        let expr = |kind| Ok(Expr { at, kind });
        let Some(token) = self.peek().cloned() else {
            return self.unexpected("a value");
        };
        self.next += 1;
        match token {
            Token::Number(n, _) => expr(ExprKind::Number(n)),
            Token::String(s) => expr(ExprKind::String(s)),
            Token::Symbol("(") => {
                let inner = self.condition()?;
                self.expect_symbol(")")?;
                Ok(inner)
            }
            Token::Symbol("{") => {
                let Some(Token::SysProp(name)) = self.peek().cloned() else {
                    return self.unexpected("a system property such as $contentType");
                };
                self.next += 1;
                self.expect_symbol("}")?;
                expr(ExprKind::Property {
                    name,
                    scope: PropertyScope::System,
                })
            }
            Token::SysProp(name) if is_body(&name) => {
                self.next -= 1; // errors point at the query
                let path = self.body_path(&name)?;
                self.next += 1;
                expr(ExprKind::Body(path))
            }
            Token::SysProp(name) => expr(ExprKind::Property {
                name,
                scope: PropertyScope::ApplicationThenSystem,
            }),
            Token::Id(id) => match id.as_str() {
                "true" => expr(ExprKind::Bool(true)),
                "false" => expr(ExprKind::Bool(false)),
                "null" => expr(ExprKind::Null),
                "undefined" => expr(ExprKind::Undefined),
                _ if self.symbol("(") => {
                    let mut args = Vec::new();
                    if !self.symbol(")") {
                        loop {
                            args.push(self.condition()?);
                            if self.symbol(")") {
                                break;
                            }
                            self.expect_symbol(",")?;
                        }
                    }
                    expr(ExprKind::Call {
                        function: id.to_ascii_lowercase(),
                        args,
                    })
                }
                _ => expr(ExprKind::Property {
                    name: id,
                    scope: PropertyScope::Application,
                }),
            },
            other => {
                self.next -= 1;
                self.error(format!("expected a value, found {other}"))
            }
        }
    }

    /// The path of a `$body` query, from the system property's name (`body.a.b[0].c`: `.`,
    /// `[` and `]` belong to the name).
    fn body_path(&self, name: &str) -> Result<Vec<PathItem>, SyntaxError> {
        let mut path = Vec::new();
        let mut rest = &name["body".len()..];
        let bad = || self.error("a $body path is .field and [index] steps, such as $body.a[0].b");
        while !rest.is_empty() {
            if let Some(after) = rest.strip_prefix('.') {
                let end = after.find(['.', '[']).unwrap_or(after.len());
                if end == 0 {
                    return bad();
                }
                path.push(PathItem::Field(after[..end].to_owned()));
                rest = &after[end..];
            } else if let Some(after) = rest.strip_prefix('[') {
                let Some((index, after)) = after.split_once(']') else {
                    return bad();
                };
                let Ok(index) = index.parse::<usize>() else {
                    return bad();
                };
                path.push(PathItem::Index(index));
                rest = after;
            } else {
                return bad();
            }
        }
        Ok(path)
    }
}
