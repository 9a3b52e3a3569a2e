//! Variable interpolation in stack files, with docker compose's rules, and the `.env` file.
//!
//! In every string value (never in keys): `$$` is a literal `$`; `$VAR` and `${VAR}` take the
//! variable's value (empty, with a warning, when it is unset); `${VAR:-default}` gives
//! `default` when VAR is unset or empty, `${VAR-default}` only when it is unset;
//! `${VAR:?message}` and `${VAR?message}` are errors carrying `message` when VAR is unset or
//! empty (resp. unset); `${VAR:+other}` and `${VAR+other}` give `other` when VAR is set and
//! non-empty (resp. set). Defaults and replacements are interpolated too (`${A:-${B}}`). A `$`
//! followed by anything else is an error, as in docker compose.
//!
//! Variables come from the caller's environment, then from the `.env` file beside the stack
//! file ([`read_env_file`]); the environment wins.
//!
//! The values are interpolated while serde reads them (see `file.rs`), so an error carries
//! serde_yaml's field path, line and column. serde's derive gives a `Deserialize` impl no
//! context argument, so the variables of the file being read are in a thread-local set for the
//! length of one parse ([`with_vars`]); hand-written because no crate implements compose's
//! interpolation for serde_yaml.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::path::Path;

use serde::de::{self, Deserialize, Deserializer, Visitor};
use serde_yaml::Value;

/// The variables a stack file is interpolated with.
#[derive(Debug, Clone, Default)]
pub struct Vars {
    /// From the `.env` file (or given by a test).
    pub file: BTreeMap<String, String>,
    /// Read the process environment first (the CLI); off in unit tests.
    pub process_env: bool,
}

impl Vars {
    /// The caller's environment and the `.env` file in `dir` (if there is one).
    pub fn for_dir(dir: &Path) -> crate::Result<Vars> {
        let path = dir.join(".env");
        let err = |msg: String| crate::Error::EnvFile { file: path.display().to_string(), msg };
        let file = match std::fs::read_to_string(&path) {
            Ok(text) => read_env_file(&text).map_err(err)?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
            Err(e) => return Err(err(e.to_string())),
        };
        Ok(Vars { file, process_env: true })
    }

    /// The value of `name`: the environment's, else the `.env` file's.
    pub fn get(&self, name: &str) -> Option<String> {
        self.process_env.then(|| std::env::var(name).ok()).flatten().or_else(|| self.file.get(name).cloned())
    }
}

struct Ctx {
    vars: Vars,
    unset: Vec<String>,
}

thread_local! {
    static CTX: RefCell<Option<Ctx>> = const { RefCell::new(None) };
}

/// Runs `f` (a parse) with `vars` as the variables of [`Interpolated`] on this thread;
/// returns its result and the names of unset variables that were used (each once).
pub fn with_vars<T>(vars: &Vars, f: impl FnOnce() -> T) -> (T, Vec<String>) {
    CTX.with(|c| *c.borrow_mut() = Some(Ctx { vars: vars.clone(), unset: Vec::new() }));
    let out = f();
    let unset = CTX.with(|c| c.borrow_mut().take().map(|c| c.unset).unwrap_or_default());
    (out, unset)
}

/// Interpolates one string with the variables of the current parse (none outside one).
pub fn interpolate_str(s: &str) -> Result<String, String> {
    if !s.contains('$') {
        return Ok(s.to_string());
    }
    CTX.with(|c| {
        let mut c = c.borrow_mut();
        match c.as_mut() {
            Some(ctx) => {
                let Ctx { vars, unset } = ctx;
                interpolate(s, &|n| vars.get(n), unset)
            }
            None => interpolate(s, &|_| None, &mut Vec::new()),
        }
    })
}

/// A YAML value read with its strings interpolated (mapping keys are not). The interpolation
/// happens while serde_yaml visits each scalar, so an error is located at that scalar (its
/// field path, line and column), not at the mapping around it.
pub struct Interpolated(pub Value);

impl<'de> Deserialize<'de> for Interpolated {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(InterpVisitor).map(Interpolated)
    }
}

struct InterpVisitor;

impl<'de> Visitor<'de> for InterpVisitor {
    type Value = Value;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a YAML value")
    }
    fn visit_bool<E: de::Error>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Value, E> {
        Ok(Value::Number(v.into()))
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Value, E> {
        Ok(Value::Number(v.into()))
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Value, E> {
        Ok(Value::Number(v.into()))
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<Value, E> {
        interpolate_str(v).map(Value::String).map_err(E::custom)
    }
    fn visit_unit<E: de::Error>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_none<E: de::Error>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        Interpolated::deserialize(d).map(|i| i.0)
    }
    fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut items = Vec::new();
        while let Some(Interpolated(v)) = seq.next_element()? {
            items.push(v);
        }
        Ok(Value::Sequence(items))
    }
    fn visit_map<A: de::MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut m = serde_yaml::Mapping::new();
        while let Some(k) = map.next_key::<Value>()? {
            let Interpolated(v) = map.next_value()?;
            m.insert(k, v);
        }
        Ok(Value::Mapping(m))
    }
    fn visit_enum<A: de::EnumAccess<'de>>(self, data: A) -> Result<Value, A::Error> {
        // serde_yaml hands a `!tag value` over as an enum.
        let (tag, variant) = data.variant::<String>()?;
        let Interpolated(value) = de::VariantAccess::newtype_variant(variant)?;
        Ok(Value::Tagged(Box::new(serde_yaml::value::TaggedValue { tag: serde_yaml::value::Tag::new(tag), value })))
    }
}

fn is_name_start(c: char) -> bool {
    c.is_ascii_alphabetic() || c == '_'
}

fn is_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

/// Interpolates `s` with `lookup`; the names of unset variables used are added to `unset`.
pub fn interpolate(
    s: &str,
    lookup: &dyn Fn(&str) -> Option<String>,
    unset: &mut Vec<String>,
) -> Result<String, String> {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        match after.chars().next() {
            Some('$') => {
                out.push('$');
                rest = &after[1..];
            }
            Some(c) if is_name_start(c) => {
                let end = after.find(|c: char| !is_name_char(c)).unwrap_or(after.len());
                let name = &after[..end];
                match lookup(name) {
                    Some(v) => out.push_str(&v),
                    None => note_unset(name, unset),
                }
                rest = &after[end..];
            }
            Some('{') => {
                let body_len = closing_brace(&after[1..])
                    .ok_or_else(|| format!("`{}`: `${{` without a closing `}}`", s.trim_end()))?;
                let body = &after[1..1 + body_len];
                out.push_str(&braced(body, lookup, unset)?);
                rest = &after[1 + body_len + 1..];
            }
            _ => {
                return Err(format!(
                    "`{}`: a `$` must start a variable ($VAR, ${{VAR}}) or be written `$$` for a literal `$`",
                    s.trim_end()
                ))
            }
        }
    }
    out.push_str(rest);
    Ok(out)
}

fn note_unset(name: &str, unset: &mut Vec<String>) {
    if !unset.iter().any(|u| u == name) {
        unset.push(name.to_string());
    }
}

/// The length of the text before the `}` that closes a `${`, counting nested `${ }`.
fn closing_brace(s: &str) -> Option<usize> {
    let mut depth = 0usize;
    let bytes = s.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'$' if bytes.get(i + 1) == Some(&b'$') => i += 1,
            b'$' if bytes.get(i + 1) == Some(&b'{') => {
                depth += 1;
                i += 1;
            }
            b'}' if depth == 0 => return Some(i),
            b'}' => depth -= 1,
            _ => {}
        }
        i += 1;
    }
    None
}

/// `NAME`, `NAME:-x`, `NAME-x`, `NAME:?x`, `NAME?x`, `NAME:+x`, `NAME+x`.
fn braced(body: &str, lookup: &dyn Fn(&str) -> Option<String>, unset: &mut Vec<String>) -> Result<String, String> {
    let end = body.find(|c: char| !is_name_char(c)).unwrap_or(body.len());
    let (name, op) = body.split_at(end);
    if !name.starts_with(is_name_start) {
        return Err(format!("`${{{body}}}`: `{name}` is not a variable name (letters, digits and `_`)"));
    }
    let value = lookup(name);
    let set_nonempty = value.as_deref().is_some_and(|v| !v.is_empty());
    // The operator is one character, or `:` and one character.
    let first = |t: &str| t.chars().next().map_or(0, char::len_utf8);
    let (op, arg) = match op.strip_prefix(':') {
        Some(r) => op.split_at(1 + first(r)),
        None => op.split_at(first(op)),
    };
    let use_arg = match op {
        "" => {
            if value.is_none() {
                note_unset(name, unset);
            }
            return Ok(value.unwrap_or_default());
        }
        ":-" => !set_nonempty,
        "-" => value.is_none(),
        ":+" => set_nonempty,
        "+" => value.is_some(),
        ":?" | "?" => {
            let missing = if op == ":?" { !set_nonempty } else { value.is_none() };
            if missing {
                let msg = interpolate(arg, lookup, unset)?;
                let why = if msg.is_empty() { String::new() } else { format!(": {msg}") };
                return Err(format!("required variable {name} is missing a value{why}"));
            }
            return Ok(value.unwrap_or_default());
        }
        _ => return Err(format!("`${{{body}}}`: unknown operator after `{name}` (use :-, -, :?, ?, :+ or +)")),
    };
    match (use_arg, op.ends_with('+')) {
        (true, _) => interpolate(arg, lookup, unset),
        (false, true) => Ok(String::new()),
        (false, false) => Ok(value.unwrap_or_default()),
    }
}

/// Reads a `.env` file: `KEY=VALUE` lines (an `export ` in front is allowed), blank lines and
/// `#` comments. A value in single quotes is taken as written; in double quotes `\n`, `\t`,
/// `\\` and `\"` are escapes; an unquoted value is trimmed and ends at ` #`. Errors name the
/// line.
pub fn read_env_file(text: &str) -> Result<BTreeMap<String, String>, String> {
    let mut out = BTreeMap::new();
    for (i, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let line = line.strip_prefix("export ").map(str::trim_start).unwrap_or(line);
        let bad = |why: &str| format!("line {}: {why}", i + 1);
        let (key, value) = line.split_once('=').ok_or_else(|| bad("expected KEY=VALUE"))?;
        let key = key.trim_end();
        if !(key.starts_with(is_name_start) && key.chars().all(is_name_char)) {
            return Err(bad(&format!("`{key}` is not a variable name (letters, digits and `_`)")));
        }
        let value = value.trim_start();
        let value = if let Some(q) = value.strip_prefix('\'') {
            let end = q.find('\'').ok_or_else(|| bad("a single quote is not closed"))?;
            q[..end].to_string()
        } else if let Some(q) = value.strip_prefix('"') {
            let mut v = String::new();
            let mut chars = q.chars();
            loop {
                match chars.next() {
                    None => return Err(bad("a double quote is not closed")),
                    Some('"') => break,
                    Some('\\') => match chars.next() {
                        Some('n') => v.push('\n'),
                        Some('t') => v.push('\t'),
                        Some(c) => v.push(c),
                        None => return Err(bad("a double quote is not closed")),
                    },
                    Some(c) => v.push(c),
                }
            }
            v
        } else {
            let v = value.find(" #").map_or(value, |i| &value[..i]);
            v.trim_end().to_string()
        };
        out.insert(key.to_string(), value);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(s: &str) -> Result<(String, Vec<String>), String> {
        let vars: BTreeMap<&str, &str> = [("A", "a"), ("EMPTY", ""), ("N", "8080")].into();
        let mut unset = Vec::new();
        interpolate(s, &|n| vars.get(n).map(|v| v.to_string()), &mut unset).map(|v| (v, unset))
    }

    fn ok(s: &str) -> String {
        run(s).unwrap().0
    }

    #[test]
    fn docker_compose_forms() {
        assert_eq!(ok("plain"), "plain");
        assert_eq!(ok("$A-${A}/${N}:80"), "a-a/8080:80");
        assert_eq!(ok("cost $$5 and $${A}"), "cost $5 and ${A}");
        assert_eq!(run("x${NOPE}y$NOPE").unwrap(), ("xy".to_string(), vec!["NOPE".to_string()]));
        assert_eq!(ok("${EMPTY:-d}|${EMPTY-d}|${NOPE-d}|${NOPE:-d}|${A:-d}"), "d||d|d|a");
        assert_eq!(ok("${A:+yes}|${EMPTY:+yes}|${EMPTY+yes}|${NOPE+yes}"), "yes||yes|");
        assert_eq!(ok("${NOPE:-${A}-${NOPE2:-z}}"), "a-z");
        assert_eq!(ok("${EMPTY?x}|${A:?x}"), "|a");
        assert_eq!(ok("${NOPE:-a}}"), "a}");
    }

    #[test]
    fn errors_say_what_is_wrong() {
        assert_eq!(
            run("${NOPE:?set NOPE in .env}").unwrap_err(),
            "required variable NOPE is missing a value: set NOPE in .env"
        );
        assert_eq!(run("${EMPTY:?}").unwrap_err(), "required variable EMPTY is missing a value");
        assert!(run("${NOPE?}").is_err() && run("${EMPTY?}").is_ok());
        assert!(run("${A").unwrap_err().contains("without a closing"));
        assert!(run("${1A}").unwrap_err().contains("not a variable name"));
        assert!(run("${A*x}").unwrap_err().contains("unknown operator"));
        assert!(run("${A:é}").unwrap_err().contains("unknown operator"));
        assert!(run("cost $5").unwrap_err().contains("$$"));
        assert!(run("end $").unwrap_err().contains("$$"));
    }

    #[test]
    fn env_files() {
        let f = read_env_file(
            "# comment\n\nA=1\nexport B = two words  # note\nC='lit ${X} # x'\nD=\"l1\\nl2 \\\"q\\\"\"\nE=\n",
        )
        .unwrap();
        let want: BTreeMap<String, String> =
            [("A", "1"), ("B", "two words"), ("C", "lit ${X} # x"), ("D", "l1\nl2 \"q\""), ("E", "")]
                .into_iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
        assert_eq!(f, want);
        assert_eq!(read_env_file("A=1\nnot a pair\n").unwrap_err(), "line 2: expected KEY=VALUE");
        assert!(read_env_file("1X=1").unwrap_err().starts_with("line 1:"));
        assert!(read_env_file("X='open").unwrap_err().contains("not closed"));
    }
}
