//! Where a valid record goes (docs/contracts.md §3): the routes, their file format, their
//! version, and the one evaluator the filter routes with and `verify` checks stored records with.
//!
//! A routes file is TOML: an ordered list of `[[route]]`s, each a `name`, an optional `when` (a
//! CEL expression over the record's fields) and a destination `to`. The first route whose `when`
//! holds takes the record; the last route has no `when`, so every valid record goes somewhere.
//! Without a routes file the filter runs [`BUILTIN`], today's rule. A set of routes is named by
//! its version: a short hash of the file's exact text.
//!
//! Expressions are compiled once, at load. Comparisons of a record field with a literal, joined
//! by `&&`, `||` and `!` (every route of the built-in set, and most hand-written ones) are also
//! compiled to a native predicate that gives the same answer as CEL without its interpreter; a
//! property test holds the two equal. Anything else runs through CEL.

use std::collections::HashSet;
use std::fmt;
use std::sync::{Arc, OnceLock};

use cel::common::ast::{Expr, LiteralValue, operators};
use cel::common::types::{CelInt, CelString};
use cel::common::value::{CowVal, Val};
use serde::Deserialize;

use crate::record::Record;

/// The routes the filter runs without a routes file: `value > 90` → RabbitMQ, the rest → file.
pub const BUILTIN: &str = r#"# The built-in routes: records whose value is above 90 go to RabbitMQ, the rest to the file.
[[route]]
name = "hot"
when = "value > 90"
to = "broker"

[[route]]
name = "rest"
to = "file"
"#;

/// The variables a `when` expression may read: the record's fields. `seq` and `value` are
/// CEL `int`s, the others `string`s (`timestamp` in the record's own RFC 3339 form, which sorts
/// as time does).
pub const VARIABLES: [&str; 6] = ["id", "source", "seq", "timestamp", "value", "hash"];

/// Longest routes file accepted.
pub const MAX_TEXT_BYTES: usize = 64 * 1024;
/// Most routes in one file.
pub const MAX_ROUTES: usize = 64;
/// Longest route name.
pub const MAX_NAME_LEN: usize = 32;

/// Where a valid record is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Destination {
    /// RabbitMQ, and from there both writers.
    Broker,
    /// The filter's JSON Lines file.
    File,
}

impl Destination {
    /// Every destination, for zeroing metric series.
    pub const ALL: [Self; 2] = [Self::Broker, Self::File];

    /// The metric label value and the word in a routes file.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Broker => "broker",
            Self::File => "file",
        }
    }
}

/// Why a routes file was refused. The text names the route and, for an expression, the line and
/// column within it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct RoutesError(pub String);

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    route: Vec<RouteSpec>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RouteSpec {
    name: String,
    when: Option<String>,
    to: Destination,
}

/// One route: records for which `when` holds go `to`.
#[derive(Debug)]
pub struct Route {
    name: String,
    when: Option<Condition>,
    to: Destination,
}

impl Route {
    /// Its name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its destination.
    pub fn to(&self) -> Destination {
        self.to
    }

    /// True when its `when` fails to evaluate for `record` (and so does not match it).
    pub fn fails_on(&self, record: &Record) -> bool {
        self.when.as_ref().is_some_and(|c| c.eval(record).is_err())
    }

    /// Its expression as written; `None` for a route that matches everything.
    pub fn when(&self) -> Option<&str> {
        self.when.as_ref().map(|c| c.text.as_str())
    }
}

struct Condition {
    text: String,
    program: cel::Program,
    native: Option<Native>,
}

impl fmt::Debug for Condition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Condition")
            .field("text", &self.text)
            .field("native", &self.native.is_some())
            .finish()
    }
}

/// A set of routes, compiled. Cheap to share behind an `Arc`.
#[derive(Debug)]
pub struct Routes {
    text: String,
    version: String,
    routes: Vec<Route>,
}

/// What routing one record decided.
#[derive(Debug, Clone, Copy)]
pub struct Choice<'a> {
    /// The route that took the record.
    pub route: &'a Route,
    /// Its position in the file (0 = first), for per-route counters.
    pub index: usize,
    /// How many `when` expressions failed to evaluate for this record (each counted as not
    /// matching).
    pub errors: u32,
}

/// The version of a routes file's text: the first 12 hex digits of its MD5.
pub fn version_of(text: &str) -> String {
    format!("{:x}", md5::compute(text.as_bytes()))[..12].to_owned()
}

impl Routes {
    /// The built-in routes, compiled once per process.
    pub fn builtin() -> Arc<Routes> {
        static BUILT: OnceLock<Arc<Routes>> = OnceLock::new();
        BUILT
            .get_or_init(|| Arc::new(Routes::parse(BUILTIN).expect("the built-in routes compile")))
            .clone()
    }

    /// The version of the built-in routes.
    pub fn builtin_version() -> String {
        version_of(BUILTIN)
    }

    /// Parses, validates and compiles a routes file's text.
    pub fn parse(text: &str) -> Result<Routes, RoutesError> {
        let fail = |msg: String| Err(RoutesError(msg));
        if text.len() > MAX_TEXT_BYTES {
            return fail(format!(
                "the routes file holds {} bytes; at most {MAX_TEXT_BYTES} are accepted",
                text.len()
            ));
        }
        let file: File = toml::from_str(text).map_err(|e| {
            RoutesError(format!(
                "not a valid routes file: {}",
                e.to_string().trim_end()
            ))
        })?;
        if file.route.is_empty() {
            return fail("the routes file holds no [[route]]".into());
        }
        if file.route.len() > MAX_ROUTES {
            return fail(format!(
                "the routes file holds {} routes; at most {MAX_ROUTES} are accepted",
                file.route.len()
            ));
        }
        let mut names = HashSet::new();
        let count = file.route.len();
        let mut routes = Vec::with_capacity(count);
        for (index, spec) in file.route.into_iter().enumerate() {
            let name = spec.name;
            if !valid_name(&name) {
                return fail(format!(
                    "route {name:?}: a name is 1 to {MAX_NAME_LEN} of a-z, 0-9, '_' and '-'"
                ));
            }
            if !names.insert(name.clone()) {
                return fail(format!("route {name:?}: the name is used twice"));
            }
            let last = index + 1 == count;
            let when = match spec.when {
                None if !last => {
                    return fail(format!(
                        "route {name:?} has no `when`, so it matches every record and the routes after it could never match; only the last route may leave out `when`"
                    ));
                }
                None => None,
                Some(_) if last => {
                    return fail(format!(
                        "route {name:?} is the last route and has a `when`: the last route must match every record (leave out `when`), so that every valid record goes somewhere"
                    ));
                }
                Some(text) => Some(compile(&name, text)?),
            };
            routes.push(Route {
                name,
                when,
                to: spec.to,
            });
        }
        Ok(Routes {
            version: version_of(text),
            text: text.to_owned(),
            routes,
        })
    }

    /// The version: a short hash of the text.
    pub fn version(&self) -> &str {
        &self.version
    }

    /// The file's text, exactly as loaded.
    pub fn text(&self) -> &str {
        &self.text
    }

    /// The routes, in order.
    pub fn routes(&self) -> &[Route] {
        &self.routes
    }

    /// The route names, in order.
    pub fn names(&self) -> Vec<&str> {
        self.routes.iter().map(|r| r.name.as_str()).collect()
    }

    /// The first route whose `when` holds for `record` (a `when` that fails to evaluate does not
    /// hold). There always is one: the last route matches everything.
    pub fn choose(&self, record: &Record) -> Choice<'_> {
        let mut errors = 0;
        for (index, route) in self.routes.iter().enumerate() {
            let matched = match &route.when {
                None => true,
                Some(condition) => match condition.eval(record) {
                    Ok(matched) => matched,
                    Err(_) => {
                        errors += 1;
                        false
                    }
                },
            };
            if matched {
                return Choice {
                    route,
                    index,
                    errors,
                };
            }
        }
        unreachable!("the last route matches every record (checked at parse)")
    }

    /// Where `record` goes.
    pub fn destination(&self, record: &Record) -> Destination {
        self.choose(record).route.to
    }

    /// One line for logs and health: `hot: value > 90 → broker; rest → file`.
    pub fn summary(&self) -> String {
        self.routes
            .iter()
            .map(|r| match r.when() {
                Some(when) => format!("{}: {when} → {}", r.name, r.to.as_str()),
                None => format!("{} → {}", r.name, r.to.as_str()),
            })
            .collect::<Vec<_>>()
            .join("; ")
    }
}

fn valid_name(name: &str) -> bool {
    (1..=MAX_NAME_LEN).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
}

/// Records of every shape a `when` must give a bool for: its type check, since CEL types are
/// known only when an expression runs.
fn probes() -> Vec<Record> {
    let at = |timestamp: &str, value: u8, seq: u64, source: &str| {
        let hash = crate::record::record_hash(timestamp, value);
        Record {
            id: "018f3c1e-0000-7000-8000-000000000000".into(),
            source: source.into(),
            seq,
            timestamp: timestamp.into(),
            value,
            hash,
            traceparent: None,
            provenance: None,
        }
    };
    vec![
        at("2026-01-01T00:00:00.000Z", 0, 1, "a"),
        at("2026-06-15T12:30:45.678Z", 50, 12_345, "generator-1"),
        at(
            "2099-12-31T23:59:59.999Z",
            100,
            crate::record::MAX_SEQ,
            &"z".repeat(64),
        ),
        at("2026-03-03T03:03:03.003Z", 91, 2, "gen"),
        at("2026-03-03T03:03:03.004Z", 90, 3, "gen"),
    ]
}

fn compile(name: &str, text: String) -> Result<Condition, RoutesError> {
    let program = cel::Program::compile(&text).map_err(|errors| {
        let first = errors.errors.first();
        let (line, column) = first.map(|e| e.pos).unwrap_or((0, 0));
        let msg = first.map(|e| e.msg.clone()).unwrap_or_default();
        RoutesError(format!(
            "route {name:?}: `when` does not parse at line {} column {}: {msg}",
            line.max(1),
            column.max(1)
        ))
    })?;
    let mut bound = HashSet::new();
    bound_variables(program.expression(), &mut bound);
    let references = program.references();
    let mut unknown: Vec<&str> = references
        .variables()
        .into_iter()
        .filter(|v| !VARIABLES.contains(v) && !bound.contains(*v))
        .collect();
    unknown.sort_unstable();
    if let Some(first) = unknown.first() {
        let (line, column) = position_of(&text, first);
        return Err(RoutesError(format!(
            "route {name:?}: `when` reads `{first}` at line {line} column {column}, which a record does not have (a record has {})",
            VARIABLES.join(", ")
        )));
    }
    let native = Native::compile(&program.expression().expr);
    let condition = Condition {
        text,
        program,
        native,
    };
    for probe in probes() {
        match condition.eval_cel(&probe) {
            Ok(_) => {}
            Err(err) => {
                return Err(RoutesError(format!(
                    "route {name:?}: `when` ({}) does not give a bool for a record such as {}: {err}",
                    condition.text,
                    probe.to_json()
                )));
            }
        }
    }
    Ok(condition)
}

/// Line and column (1-based) of the first mention of `word` in `text`, for error messages.
fn position_of(text: &str, word: &str) -> (usize, usize) {
    let offset = text.find(word).unwrap_or(0);
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, str::len) + 1;
    (line, column)
}

/// Names bound by comprehensions (`exists(x, …)`), which are not record fields.
fn bound_variables(expr: &cel::IdedExpr, out: &mut HashSet<String>) {
    match &expr.expr {
        Expr::Call(call) => {
            if let Some(target) = &call.target {
                bound_variables(target, out);
            }
            for arg in &call.args {
                bound_variables(arg, out);
            }
        }
        Expr::Comprehension(comp) => {
            out.insert(comp.iter_var.clone());
            if let Some(second) = &comp.iter_var2 {
                out.insert(second.clone());
            }
            out.insert(comp.accu_var.clone());
            for part in [
                &comp.iter_range,
                &comp.accu_init,
                &comp.loop_cond,
                &comp.loop_step,
                &comp.result,
            ] {
                bound_variables(part, out);
            }
        }
        Expr::List(list) => {
            for element in &list.elements {
                bound_variables(element, out);
            }
        }
        Expr::Select(select) => bound_variables(&select.operand, out),
        _ => {}
    }
}

/// Hands CEL the record's fields without copying the record.
struct Fields<'r>(&'r Record);

impl cel::context::VariableResolver for Fields<'_> {
    fn resolve<'b>(&'b self, variable: &str) -> Option<CowVal<'b, 'b>> {
        let record = self.0;
        let value: Box<dyn Val + 'b> = match variable {
            "id" => Box::new(CelString::from(record.id.as_str())),
            "source" => Box::new(CelString::from(record.source.as_str())),
            "seq" => Box::new(CelInt::from(record.seq as i64)),
            "timestamp" => Box::new(CelString::from(record.timestamp.as_str())),
            "value" => Box::new(CelInt::from(i64::from(record.value))),
            "hash" => Box::new(CelString::from(record.hash.as_str())),
            _ => return None,
        };
        Some(CowVal::Owned(value))
    }
}

impl Condition {
    fn eval(&self, record: &Record) -> Result<bool, String> {
        match &self.native {
            Some(native) => Ok(native.eval(record)),
            None => self.eval_cel(record),
        }
    }

    fn eval_cel(&self, record: &Record) -> Result<bool, String> {
        static ENV: OnceLock<Arc<cel::Env>> = OnceLock::new();
        let env = ENV.get_or_init(|| Arc::new(cel::Env::stdlib())).clone();
        let fields = Fields(record);
        let mut context = cel::Context::with_env(env);
        context.set_variable_resolver(&fields);
        match self.program.execute(&context) {
            Ok(cel::Value::Bool(matched)) => Ok(matched),
            Ok(other) => Err(format!("it gives {other:?}, not a bool")),
            Err(err) => Err(err.to_string()),
        }
    }
}

/// A `when` compiled to plain Rust: comparisons of one record field with a literal of the
/// field's own type, joined by `&&`, `||` and `!`. None of these can fail, so CEL's
/// error-absorbing `&&`/`||` reduce to Rust's.
#[derive(Debug, Clone)]
enum Native {
    Int(IntField, Cmp, i64),
    Text(TextField, Cmp, String),
    Bool(bool),
    Not(Box<Native>),
    And(Box<Native>, Box<Native>),
    Or(Box<Native>, Box<Native>),
}

#[derive(Debug, Clone, Copy)]
enum IntField {
    Value,
    Seq,
}

#[derive(Debug, Clone, Copy)]
enum TextField {
    Id,
    Source,
    Timestamp,
    Hash,
}

#[derive(Debug, Clone, Copy)]
enum Cmp {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
}

impl Cmp {
    fn of(func: &str) -> Option<Self> {
        Some(match func {
            operators::EQUALS => Self::Eq,
            operators::NOT_EQUALS => Self::Ne,
            operators::LESS => Self::Lt,
            operators::LESS_EQUALS => Self::Le,
            operators::GREATER => Self::Gt,
            operators::GREATER_EQUALS => Self::Ge,
            _ => return None,
        })
    }

    /// The same comparison with its operands swapped (`90 < value` is `value > 90`).
    fn flipped(self) -> Self {
        match self {
            Self::Lt => Self::Gt,
            Self::Le => Self::Ge,
            Self::Gt => Self::Lt,
            Self::Ge => Self::Le,
            same => same,
        }
    }

    fn holds<T: Ord + ?Sized>(self, left: &T, right: &T) -> bool {
        match self {
            Self::Eq => left == right,
            Self::Ne => left != right,
            Self::Lt => left < right,
            Self::Le => left <= right,
            Self::Gt => left > right,
            Self::Ge => left >= right,
        }
    }
}

impl Native {
    fn compile(expr: &Expr) -> Option<Self> {
        match expr {
            Expr::Literal(LiteralValue::Boolean(b)) => Some(Self::Bool(*b.inner())),
            Expr::Call(call) if call.target.is_none() => {
                let args = &call.args;
                match (call.func_name.as_str(), args.len()) {
                    (operators::LOGICAL_NOT, 1) => {
                        Some(Self::Not(Box::new(Self::compile(&args[0].expr)?)))
                    }
                    (operators::LOGICAL_AND, 2) => Some(Self::And(
                        Box::new(Self::compile(&args[0].expr)?),
                        Box::new(Self::compile(&args[1].expr)?),
                    )),
                    (operators::LOGICAL_OR, 2) => Some(Self::Or(
                        Box::new(Self::compile(&args[0].expr)?),
                        Box::new(Self::compile(&args[1].expr)?),
                    )),
                    (func, 2) => {
                        let cmp = Cmp::of(func)?;
                        match (&args[0].expr, &args[1].expr) {
                            (Expr::Ident(field), Expr::Literal(lit)) => {
                                Self::comparison(field, cmp, lit)
                            }
                            (Expr::Literal(lit), Expr::Ident(field)) => {
                                Self::comparison(field, cmp.flipped(), lit)
                            }
                            _ => None,
                        }
                    }
                    _ => None,
                }
            }
            _ => None,
        }
    }

    fn comparison(field: &str, cmp: Cmp, literal: &LiteralValue) -> Option<Self> {
        let int = match field {
            "value" => Some(IntField::Value),
            "seq" => Some(IntField::Seq),
            _ => None,
        };
        let text = match field {
            "id" => Some(TextField::Id),
            "source" => Some(TextField::Source),
            "timestamp" => Some(TextField::Timestamp),
            "hash" => Some(TextField::Hash),
            _ => None,
        };
        match literal {
            LiteralValue::Int(n) => Some(Self::Int(int?, cmp, *n.inner())),
            LiteralValue::String(s) => Some(Self::Text(text?, cmp, s.inner().to_owned())),
            _ => None,
        }
    }

    fn eval(&self, record: &Record) -> bool {
        match self {
            Self::Int(field, cmp, n) => {
                let have = match field {
                    IntField::Value => i64::from(record.value),
                    IntField::Seq => record.seq as i64,
                };
                cmp.holds(&have, n)
            }
            Self::Text(field, cmp, text) => {
                let have = match field {
                    TextField::Id => record.id.as_str(),
                    TextField::Source => record.source.as_str(),
                    TextField::Timestamp => record.timestamp.as_str(),
                    TextField::Hash => record.hash.as_str(),
                };
                cmp.holds(have, text.as_str())
            }
            Self::Bool(b) => *b,
            Self::Not(inner) => !inner.eval(record),
            Self::And(a, b) => a.eval(record) && b.eval(record),
            Self::Or(a, b) => a.eval(record) || b.eval(record),
        }
    }
}

#[cfg(test)]
mod tests;
