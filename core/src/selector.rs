//! Label selectors, in the Kubernetes style: `industry in (hs,auto)`, `tier=gold`,
//! `env!=prod`, `region notin (eu)`, `canary` (key exists), `!legacy` (key absent);
//! requirements separated by commas all have to hold.
//!
//! A value outside `[A-Za-z0-9._-]` (a tenant named `Acme Corp`) is written in double
//! quotes, `\"` and `\\` inside them standing for `"` and `\`: `tenant in ("Acme Corp")`.
//!
//! Like Kubernetes, `!=` and `notin` also hold when the key is absent. A selector keeps
//! its requirements in a canonical order (by key, then operator; duplicates dropped), so
//! two selectors that mean the same thing compare equal and print the same way, and the
//! printed form parses back to an equal selector.
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid selector `{}`: {reason}", shown(input))]
pub struct SelectorError {
    pub input: String,
    pub reason: String,
}

/// A selector as an error shows it: whole up to 200 characters, else its start and its
/// length. An error travels back in a gRPC status header: a 100,000-character selector
/// echoed whole overflowed it, and the CLI said "h2 protocol error" (exit 3) instead of
/// what was wrong.
pub fn shown(input: &str) -> String {
    const SHOWN: usize = 200;
    if input.chars().count() <= SHOWN {
        return input.to_string();
    }
    let start: String = input.chars().take(SHOWN).collect();
    format!("{start}... ({} characters)", input.chars().count())
}

/// What a requirement asks of its key's value.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
enum Op {
    Exists,
    NotExists,
    Equals(String),
    NotEquals(String),
    In(BTreeSet<String>),
    NotIn(BTreeSet<String>),
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
struct Requirement {
    key: String,
    op: Op,
}

impl Requirement {
    fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        let value = labels.get(&self.key);
        match &self.op {
            Op::Exists => value.is_some(),
            Op::NotExists => value.is_none(),
            Op::Equals(v) => value == Some(v),
            Op::NotEquals(v) => value != Some(v),
            Op::In(set) => value.is_some_and(|v| set.contains(v)),
            Op::NotIn(set) => value.is_none_or(|v| !set.contains(v)),
        }
    }
}

impl fmt::Display for Requirement {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let set = |s: &BTreeSet<String>| {
            s.iter()
                .map(|v| quoted(v).into_owned())
                .collect::<Vec<_>>()
                .join(",")
        };
        match &self.op {
            Op::Exists => write!(f, "{}", self.key),
            Op::NotExists => write!(f, "!{}", self.key),
            Op::Equals(v) => write!(f, "{}={}", self.key, quoted(v)),
            Op::NotEquals(v) => write!(f, "{}!={}", self.key, quoted(v)),
            Op::In(s) => write!(f, "{} in ({})", self.key, set(s)),
            Op::NotIn(s) => write!(f, "{} notin ({})", self.key, set(s)),
        }
    }
}

/// `value` as a selector writes it: as it is when every character may stand bare (or it
/// is empty), else in double quotes with `"` and `\` escaped. What a program that builds
/// a selector from names it does not control (tenants found on a shard) writes them with.
pub fn quoted(value: &str) -> std::borrow::Cow<'_, str> {
    if value.chars().all(is_value_char) {
        return std::borrow::Cow::Borrowed(value);
    }
    let mut out = String::with_capacity(value.len() + 2);
    out.push('"');
    for c in value.chars() {
        if matches!(c, '"' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('"');
    std::borrow::Cow::Owned(out)
}

/// A parsed label selector. The default (and the empty string) selects everything.
#[derive(Debug, Clone, PartialEq, Eq, Default, Hash)]
pub struct Selector {
    requirements: Vec<Requirement>,
}

impl Selector {
    /// Parses a selector; the empty string selects everything.
    pub fn parse(input: &str) -> Result<Selector, SelectorError> {
        let fail = |reason: String| SelectorError {
            input: input.to_string(),
            reason,
        };
        let tokens = lex(input).map_err(fail)?;
        let mut requirements = Parser {
            tokens: &tokens,
            pos: 0,
            input_len: input.len(),
        }
        .selector()
        .map_err(fail)?;
        requirements.sort();
        requirements.dedup();
        Ok(Selector { requirements })
    }

    pub fn is_empty(&self) -> bool {
        self.requirements.is_empty()
    }

    /// Whether a target with these labels is selected: every requirement holds.
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.requirements.iter().all(|r| r.matches(labels))
    }

    /// Whether some target whose labels include `known` (a shard's, when its tenants are
    /// not known) could be selected: every requirement on a key of `known` holds; those on
    /// other keys (a tenant's own labels) may.
    pub fn may_match(&self, known: &BTreeMap<String, String>) -> bool {
        self.requirements
            .iter()
            .filter(|r| known.contains_key(&r.key))
            .all(|r| r.matches(known))
    }
}

impl fmt::Display for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, r) in self.requirements.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{r}")?;
        }
        Ok(())
    }
}

impl std::str::FromStr for Selector {
    type Err = SelectorError;
    fn from_str(s: &str) -> Result<Selector, SelectorError> {
        Selector::parse(s)
    }
}

// ---------------------------------------------------------------- lexing

#[derive(Debug, Clone, PartialEq, Eq)]
enum Tok {
    /// A run of [A-Za-z0-9._/-]: a key, a value, or the words `in` / `notin`.
    Word(String),
    /// A value in double quotes, unescaped.
    Quoted(String),
    Eq,
    DoubleEq,
    NotEq,
    Bang,
    Open,
    Close,
    Comma,
}

impl fmt::Display for Tok {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Tok::Word(w) => write!(f, "`{w}`"),
            Tok::Quoted(w) => write!(f, "`{}`", quoted(w)),
            Tok::Eq => f.write_str("`=`"),
            Tok::DoubleEq => f.write_str("`==`"),
            Tok::NotEq => f.write_str("`!=`"),
            Tok::Bang => f.write_str("`!`"),
            Tok::Open => f.write_str("`(`"),
            Tok::Close => f.write_str("`)`"),
            Tok::Comma => f.write_str("`,`"),
        }
    }
}

fn is_key_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '/')
}

fn is_value_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')
}

/// Tokens with their byte offset in the input.
fn lex(input: &str) -> Result<Vec<(usize, Tok)>, String> {
    let mut out = Vec::new();
    let mut chars = input.char_indices().peekable();
    while let Some((at, c)) = chars.next() {
        let tok = match c {
            c if c.is_whitespace() => continue,
            '(' => Tok::Open,
            ')' => Tok::Close,
            ',' => Tok::Comma,
            '=' => {
                if chars.next_if(|&(_, c)| c == '=').is_some() {
                    Tok::DoubleEq
                } else {
                    Tok::Eq
                }
            }
            '!' => {
                if chars.next_if(|&(_, c)| c == '=').is_some() {
                    Tok::NotEq
                } else {
                    Tok::Bang
                }
            }
            '"' => {
                let mut value = String::new();
                loop {
                    match chars.next() {
                        Some((_, '"')) => break,
                        Some((slash, '\\')) => match chars.next() {
                            Some((_, c @ ('"' | '\\'))) => value.push(c),
                            Some((_, c)) => {
                                return Err(format!(
                                    "`\\{c}` at column {} in a quoted value: only `\\\"` and `\\\\` are escapes",
                                    slash + 1
                                ));
                            }
                            None => {
                                return Err(format!(
                                    "the quoted value at column {} has no closing `\"`",
                                    at + 1
                                ));
                            }
                        },
                        Some((i, c)) if c.is_control() => {
                            return Err(format!(
                                "a control character in the quoted value at column {}",
                                i + 1
                            ));
                        }
                        Some((_, c)) => value.push(c),
                        None => {
                            return Err(format!(
                                "the quoted value at column {} has no closing `\"`",
                                at + 1
                            ));
                        }
                    }
                }
                Tok::Quoted(value)
            }
            c if is_key_char(c) => {
                let mut end = at + c.len_utf8();
                while let Some((i, c)) = chars.next_if(|&(_, c)| is_key_char(c)) {
                    end = i + c.len_utf8();
                }
                Tok::Word(input[at..end].to_string())
            }
            other => {
                return Err(format!(
                    "unexpected character {other:?} at column {}",
                    at + 1
                ));
            }
        };
        out.push((at, tok));
    }
    Ok(out)
}

// ---------------------------------------------------------------- parsing

struct Parser<'a> {
    tokens: &'a [(usize, Tok)],
    pos: usize,
    input_len: usize,
}

impl Parser<'_> {
    fn peek(&self) -> Option<&Tok> {
        self.tokens.get(self.pos).map(|(_, t)| t)
    }

    fn next(&mut self) -> Option<Tok> {
        let t = self.tokens.get(self.pos).map(|(_, t)| t.clone());
        self.pos += 1;
        t
    }

    /// "`x` at column N" for the token at `pos`, or "the end" past the last one.
    fn describe(&self, pos: usize) -> String {
        match self.tokens.get(pos) {
            Some((at, t)) => format!("{t} at column {}", at + 1),
            None => format!("the end (column {})", self.input_len + 1),
        }
    }

    fn selector(&mut self) -> Result<Vec<Requirement>, String> {
        let mut out = Vec::new();
        if self.tokens.is_empty() {
            return Ok(out);
        }
        loop {
            out.push(self.requirement()?);
            match self.next() {
                None => return Ok(out),
                Some(Tok::Comma) => {
                    if self.peek().is_none() {
                        return Err(format!(
                            "expected a requirement after `,`, found {}",
                            self.describe(self.pos)
                        ));
                    }
                }
                Some(_) => {
                    return Err(format!(
                        "expected `,` or the end after a requirement, found {}",
                        self.describe(self.pos - 1)
                    ));
                }
            }
        }
    }

    fn key(&mut self, after: &str) -> Result<String, String> {
        let at = self.pos;
        match self.next() {
            Some(Tok::Word(w)) => Ok(w),
            _ => Err(format!(
                "expected a label key{after}, found {}",
                self.describe(at)
            )),
        }
    }

    fn requirement(&mut self) -> Result<Requirement, String> {
        if self.peek() == Some(&Tok::Bang) {
            self.pos += 1;
            let key = self.key(" after `!`")?;
            return Ok(Requirement {
                key,
                op: Op::NotExists,
            });
        }
        let key = self.key("")?;
        let at = self.pos;
        let op = match self.peek() {
            None | Some(Tok::Comma) => Op::Exists,
            Some(Tok::Eq) | Some(Tok::DoubleEq) => {
                self.pos += 1;
                Op::Equals(self.value(at)?)
            }
            Some(Tok::NotEq) => {
                self.pos += 1;
                Op::NotEquals(self.value(at)?)
            }
            Some(Tok::Word(w)) if w == "in" || w == "notin" => {
                let negated = w == "notin";
                self.pos += 1;
                let set = self.set(if negated { "notin" } else { "in" })?;
                if negated { Op::NotIn(set) } else { Op::In(set) }
            }
            Some(_) => {
                return Err(format!(
                    "expected `=`, `==`, `!=`, `in`, `notin`, `,` or the end after key `{key}`, found {}",
                    self.describe(at)
                ));
            }
        };
        Ok(Requirement { key, op })
    }

    /// The value after `=`, `==` or `!=` (at `op_at`): a word, or nothing (the empty value).
    fn value(&mut self, op_at: usize) -> Result<String, String> {
        match self.peek() {
            None | Some(Tok::Comma) => Ok(String::new()),
            Some(Tok::Word(w)) => {
                let w = w.clone();
                self.check_value(&w, self.pos)?;
                self.pos += 1;
                Ok(w)
            }
            Some(Tok::Quoted(w)) => {
                let w = w.clone();
                self.pos += 1;
                Ok(w)
            }
            Some(_) => Err(format!(
                "expected a value after {}, found {}",
                self.tokens[op_at].1,
                self.describe(self.pos)
            )),
        }
    }

    fn check_value(&self, w: &str, pos: usize) -> Result<(), String> {
        match w.chars().find(|&c| !is_value_char(c)) {
            None => Ok(()),
            Some(c) => Err(format!(
                "value `{w}` at column {} holds {c:?}; values use [A-Za-z0-9._-], or are written in double quotes",
                self.tokens[pos].0 + 1
            )),
        }
    }

    /// `( v1, v2, ... )` after `in`/`notin`. Like Kubernetes, a value may be empty: `()` is
    /// the set holding the empty value.
    fn set(&mut self, word: &str) -> Result<BTreeSet<String>, String> {
        let at = self.pos;
        if self.next() != Some(Tok::Open) {
            return Err(format!(
                "expected `(` after `{word}`, found {}",
                self.describe(at)
            ));
        }
        let mut set = BTreeSet::new();
        loop {
            match self.peek() {
                Some(Tok::Word(w)) => {
                    let w = w.clone();
                    self.check_value(&w, self.pos)?;
                    self.pos += 1;
                    set.insert(w);
                }
                Some(Tok::Quoted(w)) => {
                    let w = w.clone();
                    self.pos += 1;
                    set.insert(w);
                }
                Some(Tok::Comma) | Some(Tok::Close) => {
                    set.insert(String::new());
                }
                _ => {
                    return Err(format!(
                        "expected a value, `,` or `)` in the set after `{word}`, found {}",
                        self.describe(self.pos)
                    ));
                }
            }
            let at = self.pos;
            match self.next() {
                Some(Tok::Comma) => {}
                Some(Tok::Close) => return Ok(set),
                _ => {
                    return Err(format!(
                        "expected `,` or `)` in the set after `{word}`, found {}",
                        self.describe(at)
                    ));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn sel(s: &str) -> Selector {
        Selector::parse(s).unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    fn err(s: &str) -> String {
        match Selector::parse(s) {
            Ok(sel) => panic!("`{s}` parsed as `{sel}`"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn may_match_leaves_keys_it_is_not_given_open() {
        let shard = labels(&[("shard", "s1"), ("region", "r1")]);
        assert!(sel("region=r1").may_match(&shard));
        assert!(!sel("region=r0").may_match(&shard));
        assert!(!sel("shard notin (s1)").may_match(&shard));
        // a tenant's own label: not known here, so it may hold
        assert!(sel("tenant=tenant_a").may_match(&shard));
        assert!(sel("region=r1,tier=internal").may_match(&shard));
        assert!(!sel("region=r0,tier=internal").may_match(&shard));
    }

    #[test]
    fn empty_selects_everything() {
        for s in ["", "   ", "\t\n"] {
            let s = sel(s);
            assert!(s.is_empty());
            assert!(s.matches(&labels(&[])));
            assert!(s.matches(&labels(&[("a", "b")])));
            assert_eq!(s.to_string(), "");
        }
        assert_eq!(Selector::default(), sel(""));
        assert!(Selector::default().matches(&labels(&[("x", "y")])));
    }

    #[test]
    fn equality() {
        let hs = labels(&[("industry", "hs")]);
        let auto = labels(&[("industry", "auto")]);
        let none = labels(&[]);
        for s in [
            "industry=hs",
            "industry==hs",
            " industry = hs ",
            "industry == hs",
        ] {
            let s = sel(s);
            assert!(s.matches(&hs));
            assert!(!s.matches(&auto));
            assert!(!s.matches(&none));
            assert_eq!(s.to_string(), "industry=hs");
        }
        let ne = sel("industry!=hs");
        assert!(!ne.matches(&hs));
        assert!(ne.matches(&auto));
        assert!(
            ne.matches(&none),
            "!= holds when the key is absent, as in Kubernetes"
        );
    }

    #[test]
    fn sets() {
        let s = sel("industry in (hs, auto)");
        assert!(s.matches(&labels(&[("industry", "hs")])));
        assert!(s.matches(&labels(&[("industry", "auto")])));
        assert!(!s.matches(&labels(&[("industry", "vet")])));
        assert!(!s.matches(&labels(&[])));
        assert_eq!(s.to_string(), "industry in (auto,hs)");

        let s = sel("region notin (eu,us)");
        assert!(!s.matches(&labels(&[("region", "eu")])));
        assert!(s.matches(&labels(&[("region", "ap")])));
        assert!(
            s.matches(&labels(&[])),
            "notin holds when the key is absent"
        );

        assert_eq!(sel("a in(x)"), sel("a in (x)"));
        assert_eq!(sel("a in ( x , y )"), sel("a in (y,x)"));
    }

    #[test]
    fn exists_and_absent() {
        let s = sel("canary");
        assert!(s.matches(&labels(&[("canary", "")])));
        assert!(s.matches(&labels(&[("canary", "yes")])));
        assert!(!s.matches(&labels(&[])));
        let s = sel("!legacy");
        assert!(s.matches(&labels(&[])));
        assert!(!s.matches(&labels(&[("legacy", "true")])));
        assert_eq!(sel("! legacy").to_string(), "!legacy");
    }

    #[test]
    fn empty_values() {
        let s = sel("tier=");
        assert!(s.matches(&labels(&[("tier", "")])));
        assert!(!s.matches(&labels(&[("tier", "gold")])));
        assert!(!s.matches(&labels(&[])));
        assert_eq!(sel("tier=, b").to_string(), "b,tier=");
        let s = sel("tier in ()");
        assert!(s.matches(&labels(&[("tier", "")])));
        assert!(!s.matches(&labels(&[("tier", "x")])));
        let s = sel("tier in (,gold)");
        assert!(s.matches(&labels(&[("tier", "")])));
        assert!(s.matches(&labels(&[("tier", "gold")])));
    }

    #[test]
    fn all_requirements_must_hold() {
        let s = sel("industry in (hs,auto), tier=gold, !legacy, region notin (eu), canary");
        let mut l = labels(&[
            ("industry", "hs"),
            ("tier", "gold"),
            ("region", "us"),
            ("canary", "1"),
        ]);
        assert!(s.matches(&l));
        l.insert("legacy".into(), "x".into());
        assert!(!s.matches(&l));
        l.remove("legacy");
        l.insert("region".into(), "eu".into());
        assert!(!s.matches(&l));
        l.insert("region".into(), "us".into());
        l.remove("canary");
        assert!(!s.matches(&l));
    }

    #[test]
    fn keys_may_hold_prefixes_and_dots() {
        let s = sel("flotilla.io/industry=hs,app.kubernetes.io-name_x in (a.b,c-d,e_f)");
        assert!(s.matches(&labels(&[
            ("flotilla.io/industry", "hs"),
            ("app.kubernetes.io-name_x", "c-d")
        ])));
    }

    #[test]
    fn display_is_canonical_and_round_trips() {
        let inputs = [
            "industry in (hs,auto)",
            "b=1, a=2",
            "a==x,a=x",
            "!z, y, x!=1, w notin (q, p), v in ()",
            "k in (,a)",
            "tier=",
            "k.io/x-y_z=v.1",
        ];
        for input in inputs {
            let s = sel(input);
            let printed = s.to_string();
            let again = sel(&printed);
            assert_eq!(s, again, "{input} -> {printed}");
            assert_eq!(printed, again.to_string());
        }
        assert_eq!(sel("b=1, a=2").to_string(), "a=2,b=1");
        assert_eq!(sel("a==x,a=x").to_string(), "a=x");
        assert_eq!(sel("b=1,a=2"), sel("a=2 , b=1"));
        assert_eq!("x in (a)".parse::<Selector>().unwrap(), sel("x in (a)"));
    }

    /// Values no bare word can hold (tenants are named by the databases they live in) are
    /// written quoted, and print back quoted.
    #[test]
    fn quoted_values_hold_any_name() {
        let names = [
            "tenant x",
            "Tenant_Upper",
            "tenant_\"; drop",
            "a\\b",
            "in",
            "é",
        ];
        for name in names {
            let written = format!("tenant in ({}),x={}", quoted(name), quoted(name));
            let s = sel(&written);
            assert!(
                s.matches(&labels(&[("tenant", name), ("x", name)])),
                "{written}"
            );
            assert!(!s.matches(&labels(&[("tenant", "other"), ("x", name)])));
            assert_eq!(sel(&s.to_string()), s, "{written} -> {s}");
        }
        assert_eq!(quoted("tenant_1"), "tenant_1");
        assert_eq!(quoted("a b"), "\"a b\"");
        assert_eq!(quoted("q\"\\"), "\"q\\\"\\\\\"");
        assert_eq!(sel("t=\"a b\"").to_string(), "t=\"a b\"");
        let e = err("t=\"a b");
        assert!(e.contains("has no closing"), "{e}");
        let e = err("t=\"a\\");
        assert!(e.contains("has no closing"), "{e}");
        let e = err("t=\"a\\nb\"");
        assert!(e.contains("only"), "{e}");
        let e = err("t=a b");
        assert!(e.contains("expected `,` or the end"), "{e}");
    }

    #[test]
    fn errors_name_the_problem() {
        assert_eq!(
            err("industry in hs"),
            "invalid selector `industry in hs`: expected `(` after `in`, found `hs` at column 13"
        );
        let e = err("industry notin hs");
        assert!(e.contains("expected `(` after `notin`"), "{e}");
        let e = err("industry in (hs");
        assert!(
            e.contains("expected `,` or `)`") && e.contains("the end"),
            "{e}"
        );
        let e = err("a=b,");
        assert!(e.contains("expected a requirement after `,`"), "{e}");
        let e = err("a=b,,c");
        assert!(
            e.contains("expected a label key, found `,` at column 5"),
            "{e}"
        );
        let e = err(",a");
        assert!(
            e.contains("expected a label key, found `,` at column 1"),
            "{e}"
        );
        let e = err("a=b c=d");
        assert!(
            e.contains("expected `,` or the end after a requirement, found `c`"),
            "{e}"
        );
        let e = err("a b");
        assert!(e.contains("after key `a`, found `b` at column 3"), "{e}");
        let e = err("a=b=c");
        assert!(
            e.contains("expected `,` or the end after a requirement, found `=` at column 4"),
            "{e}"
        );
        let e = err("a=x/y");
        assert!(e.contains("value `x/y` at column 3 holds '/'"), "{e}");
        let e = err("a in (x/y)");
        assert!(e.contains("value `x/y`"), "{e}");
        let e = err("a=(x)");
        assert!(
            e.contains("expected a value after `=`, found `(` at column 3"),
            "{e}"
        );
        let e = err("tier=gold;drop");
        assert!(e.contains("unexpected character ';' at column 10"), "{e}");
        let e = err("ünïcode=1");
        assert!(e.contains("unexpected character 'ü' at column 1"), "{e}");
        let e = err("!");
        assert!(
            e.contains("expected a label key after `!`, found the end"),
            "{e}"
        );
        let e = err("!a=b");
        assert!(
            e.contains("expected `,` or the end after a requirement, found `=`"),
            "{e}"
        );
        let e = err("a in (x,(y))");
        assert!(e.contains("found `(` at column 9"), "{e}");
        let e = err("=x");
        assert!(
            e.contains("expected a label key, found `=` at column 1"),
            "{e}"
        );
    }

    /// A huge bad selector is named by its start and length, not echoed whole.
    #[test]
    fn a_huge_bad_selector_is_shown_shortened() {
        let huge = format!("tenant in ({}", "t,".repeat(50_000));
        let e = Selector::parse(&huge).unwrap_err().to_string();
        assert!(e.len() < 600, "{}", e.len());
        assert!(e.contains("(100011 characters)"), "{e}");
        let e = Selector::parse("=gold").unwrap_err().to_string();
        assert!(e.starts_with("invalid selector `=gold`"), "{e}");
    }
}
