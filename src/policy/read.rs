//! Reading a policy as Vault stores it, HCL 1 or the JSON form, into [`Rule`]s, with typed
//! errors naming the line. The HCL reader is this module's own: hcl-rs parses HCL 2 and rejects
//! HCL 1 forms Vault accepts (the test `hcl_rs_rejects_hcl1_policies_vault_accepts` lists them).

use super::Rule;

/// Why a policy text cannot be read. The texts are what `dbward check --diff-policy` shows.
#[derive(Debug, thiserror::Error)]
pub(crate) enum PolicyError {
    #[error("not valid JSON: {0}")]
    Json(#[source] serde_json::Error),
    #[error("\"path\" is not an object")]
    PathNotAnObject,
    #[error("line {line}: {syntax}")]
    Hcl { line: usize, syntax: HclSyntax },
}

/// What is wrong in an HCL policy, at a line [`PolicyError::Hcl`] names.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum HclSyntax {
    #[error("unterminated string")]
    UnterminatedString,
    #[error("unexpected character {0:?}")]
    UnexpectedCharacter(char),
    #[error("missing '}}'")]
    MissingBrace,
    #[error("missing ']'")]
    MissingBracket,
    #[error("expected '{{' or '=' after {0:?}")]
    ExpectedBlockOrAttribute(String),
    /// The token, as written.
    #[error("unexpected {0}")]
    Unexpected(String),
    #[error("expected a value")]
    ExpectedValue,
}

/// Parses a policy as Vault stores it: HCL, or the JSON form. Blocks naming the same path are
/// merged, as Vault merges them. Everything but `path` blocks' capabilities is ignored.
pub(crate) fn parse_policy(text: &str) -> Result<Vec<Rule>, PolicyError> {
    let blocks = if text.trim_start().starts_with('{') {
        parse_json_policy(text)?
    } else {
        parse_hcl_policy(text)?
    };
    let mut merged: Vec<Rule> = Vec::new();
    for b in blocks {
        match merged.iter_mut().find(|r| r.path == b.path) {
            Some(r) => {
                for c in b.capabilities {
                    if !r.capabilities.contains(&c) {
                        r.capabilities.push(c);
                    }
                }
            }
            None => merged.push(b),
        }
    }
    Ok(merged)
}

/// The pre-capabilities `policy = "read"` shorthand, as Vault expands it.
fn legacy_policy(word: &str) -> Vec<String> {
    let caps: &[&str] = match word {
        "deny" => &["deny"],
        "read" => &["read", "list"],
        "write" => &["create", "read", "update", "delete", "list"],
        "sudo" => &["create", "read", "update", "delete", "list", "sudo"],
        _ => &[],
    };
    caps.iter().map(|c| c.to_string()).collect()
}

fn parse_json_policy(text: &str) -> Result<Vec<Rule>, PolicyError> {
    let v: serde_json::Value = serde_json::from_str(text).map_err(PolicyError::Json)?;
    let mut out = Vec::new();
    // `"path"` is an object of paths, or (HCL's JSON form) a list of such objects.
    let groups: Vec<&serde_json::Value> = match &v["path"] {
        serde_json::Value::Array(a) => a.iter().collect(),
        serde_json::Value::Null => vec![],
        other => vec![other],
    };
    for g in groups {
        let Some(paths) = g.as_object() else {
            return Err(PolicyError::PathNotAnObject);
        };
        for (path, body) in paths {
            let bodies: Vec<&serde_json::Value> = match body {
                serde_json::Value::Array(a) => a.iter().collect(),
                other => vec![other],
            };
            for b in bodies {
                let mut caps: Vec<String> = b["capabilities"]
                    .as_array()
                    .map(|a| a.iter().filter_map(|c| c.as_str().map(str::to_string)).collect())
                    .unwrap_or_default();
                if let Some(p) = b["policy"].as_str() {
                    caps.extend(legacy_policy(p));
                }
                out.push(Rule {
                    path: path.clone(),
                    capabilities: caps,
                });
            }
        }
    }
    Ok(out)
}

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Str(String),
    Ident(String),
    Punct(char),
}

fn tokenize(text: &str) -> Result<Vec<(Tok, usize)>, PolicyError> {
    let error = |line: usize, syntax: HclSyntax| Err(PolicyError::Hcl { line, syntax });
    let chars: Vec<char> = text.chars().collect();
    let mut toks = Vec::new();
    let mut i = 0;
    let mut line = 1;
    while i < chars.len() {
        let c = chars[i];
        match c {
            '\n' => {
                line += 1;
                i += 1;
            }
            c if c.is_whitespace() => i += 1,
            '#' => {
                while i < chars.len() && chars[i] != '\n' {
                    i += 1;
                }
            }
            '/' if chars.get(i + 1) == Some(&'/') => {
                while i < chars.len() && chars[i] != '\n' {
                    i += 1;
                }
            }
            '/' if chars.get(i + 1) == Some(&'*') => {
                i += 2;
                while i < chars.len() && !(chars[i] == '*' && chars.get(i + 1) == Some(&'/')) {
                    if chars[i] == '\n' {
                        line += 1;
                    }
                    i += 1;
                }
                i += 2;
            }
            '"' => {
                let start_line = line;
                let mut s = String::new();
                i += 1;
                loop {
                    match chars.get(i) {
                        None => return error(start_line, HclSyntax::UnterminatedString),
                        Some('"') => break,
                        Some('\\') => {
                            match chars.get(i + 1) {
                                Some('n') => s.push('\n'),
                                Some('t') => s.push('\t'),
                                Some(&o) => s.push(o),
                                None => return error(start_line, HclSyntax::UnterminatedString),
                            }
                            i += 2;
                        }
                        Some(&o) => {
                            if o == '\n' {
                                line += 1;
                            }
                            s.push(o);
                            i += 1;
                        }
                    }
                }
                i += 1;
                toks.push((Tok::Str(s), start_line));
            }
            '{' | '}' | '[' | ']' | '=' | ',' | ':' => {
                toks.push((Tok::Punct(c), line));
                i += 1;
            }
            c if c.is_alphanumeric() || c == '_' || c == '-' || c == '.' => {
                let mut s = String::new();
                while i < chars.len() && (chars[i].is_alphanumeric() || "_-.".contains(chars[i])) {
                    s.push(chars[i]);
                    i += 1;
                }
                toks.push((Tok::Ident(s), line));
            }
            other => return error(line, HclSyntax::UnexpectedCharacter(other)),
        }
    }
    Ok(toks)
}

/// A small HCL reader: enough of the grammar to walk any policy (blocks, attributes, lists,
/// objects) and keep `path "..." { capabilities = [...] }`.
struct Hcl {
    toks: Vec<(Tok, usize)>,
    pos: usize,
}

impl Hcl {
    fn peek(&self) -> Option<&Tok> {
        self.toks.get(self.pos).map(|t| &t.0)
    }

    fn line(&self) -> usize {
        self.toks.get(self.pos).or(self.toks.last()).map(|t| t.1).unwrap_or(1)
    }

    fn next(&mut self) -> Option<Tok> {
        let t = self.toks.get(self.pos).map(|t| t.0.clone());
        self.pos += 1;
        t
    }

    fn err<T>(&self, syntax: HclSyntax) -> Result<T, PolicyError> {
        Err(PolicyError::Hcl {
            line: self.line(),
            syntax,
        })
    }

    /// A body: up to its `}` when `nested`, else to the end of input. Top-level
    /// `path "..." { ... }` blocks become rules; `path` is the block being read, if any.
    fn body(&mut self, nested: bool, rules: &mut Vec<Rule>, path: Option<&str>) -> Result<(), PolicyError> {
        loop {
            match self.peek() {
                None if nested => return self.err(HclSyntax::MissingBrace),
                None => return Ok(()),
                Some(Tok::Punct('}')) if nested => {
                    self.pos += 1;
                    return Ok(());
                }
                Some(Tok::Punct(',')) => self.pos += 1,
                Some(Tok::Ident(_)) | Some(Tok::Str(_)) => {
                    let key = match self.next() {
                        Some(Tok::Ident(s)) | Some(Tok::Str(s)) => s,
                        _ => unreachable!(),
                    };
                    let mut labels = Vec::new();
                    while let Some(Tok::Str(l)) = self.peek() {
                        labels.push(l.clone());
                        self.pos += 1;
                    }
                    match self.next() {
                        Some(Tok::Punct('{')) => {
                            if !nested && key == "path" && labels.len() == 1 {
                                rules.push(Rule {
                                    path: labels[0].clone(),
                                    capabilities: vec![],
                                });
                                self.body(true, rules, Some(&labels[0]))?;
                            } else {
                                self.body(true, rules, None)?;
                            }
                        }
                        Some(Tok::Punct('=')) | Some(Tok::Punct(':')) if labels.is_empty() => {
                            let value = self.value()?;
                            if let Some(p) = path {
                                let rule = rules.iter_mut().rev().find(|r| r.path == p).expect("pushed above");
                                match (key.as_str(), value) {
                                    ("capabilities", Value::List(caps)) => rule.capabilities.extend(caps),
                                    ("policy", Value::Str(p)) => rule.capabilities.extend(legacy_policy(&p)),
                                    _ => {}
                                }
                            }
                        }
                        _ => return self.err(HclSyntax::ExpectedBlockOrAttribute(key)),
                    }
                }
                Some(other) => {
                    let o = format!("{other:?}");
                    return self.err(HclSyntax::Unexpected(o));
                }
            }
        }
    }

    fn value(&mut self) -> Result<Value, PolicyError> {
        match self.next() {
            Some(Tok::Str(s)) => Ok(Value::Str(s)),
            Some(Tok::Ident(s)) => Ok(Value::Str(s)),
            Some(Tok::Punct('[')) => {
                let mut items = Vec::new();
                loop {
                    match self.peek() {
                        Some(Tok::Punct(']')) => {
                            self.pos += 1;
                            return Ok(Value::List(items));
                        }
                        Some(Tok::Punct(',')) => self.pos += 1,
                        None => return self.err(HclSyntax::MissingBracket),
                        _ => {
                            if let Value::Str(s) = self.value()? {
                                items.push(s);
                            }
                        }
                    }
                }
            }
            Some(Tok::Punct('{')) => {
                // An object value (allowed_parameters = { ... }): walked, not kept.
                let mut ignored = Vec::new();
                self.body(true, &mut ignored, None)?;
                Ok(Value::Other)
            }
            _ => self.err(HclSyntax::ExpectedValue),
        }
    }
}

enum Value {
    Str(String),
    List(Vec<String>),
    Other,
}

fn parse_hcl_policy(text: &str) -> Result<Vec<Rule>, PolicyError> {
    let mut p = Hcl {
        toks: tokenize(text)?,
        pos: 0,
    };
    let mut rules = Vec::new();
    p.body(false, &mut rules, None)?;
    Ok(rules)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hcl_policies_parse_with_comments_legacy_and_objects() {
        let text = r#"
            # comment
            path "secret/data/a/*" {
              capabilities = ["read", "list"] // trailing
              allowed_parameters = { "x" = [], "y" = ["1"] }
            }
            /* block
               comment */
            path "database/creds/+" { policy = "read" }
            path "secret/data/a/*" { capabilities = ["update"] }
            path "sys/leases/revoke" { capabilities = ["deny"] }
        "#;
        let rules = parse_policy(text).unwrap();
        assert_eq!(rules.len(), 3);
        assert_eq!(rules[0].capabilities, vec!["read", "list", "update"]);
        assert_eq!(rules[1].capabilities, vec!["read", "list"]);
        assert!(!rules[2].allows("update"));
        let e = parse_policy("path \"x\" { capabilities = [\"read\"]").unwrap_err();
        assert!(e.to_string().contains("missing '}'"), "{e}");
        assert!(matches!(
            e,
            PolicyError::Hcl {
                line: 1,
                syntax: HclSyntax::MissingBrace
            }
        ));
        let e = parse_policy("path \"x\" {\n  capabilities = [\"read\"\n  @\n}").unwrap_err();
        assert_eq!(e.to_string(), "line 3: unexpected character '@'");
    }

    /// Vault reads policies with HCL 1 (hashicorp/hcl v1), which accepts forms HCL 2 does not.
    /// Policies like these are stored in Vault, so the reader must take them all.
    const HCL1_POLICIES: &[(&str, &str)] = &[
        // HCL 1 object lists may be comma-delimited, or not delimited at all, on one line.
        (
            "two attributes on one line",
            r#"path "a/*" { capabilities = ["read"], policy = "write" }"#,
        ),
        (
            "no delimiter",
            r#"path "a/*" { capabilities = ["read"] policy = "write" }"#,
        ),
        (
            "comma between blocks",
            "path \"a/*\" { capabilities = [\"read\"] },\npath \"b\" { capabilities = [\"read\"] }",
        ),
        // `key { ... }` is `key = { ... }` in HCL 1, and object keys may be quoted.
        (
            "parameters as a block with quoted keys",
            "path \"a/*\" {\n  capabilities = [\"create\"]\n  allowed_parameters {\n    \"*\" = []\n  }\n}",
        ),
        // Vault does not interpolate: `${...}` in a path is literal text.
        (
            "dollar brace in a path",
            r#"path "a/${user}/*" { capabilities = ["read"] }"#,
        ),
    ];

    #[test]
    fn hcl1_forms_vault_accepts_are_read() {
        for (what, text) in HCL1_POLICIES {
            let rules = parse_policy(text).unwrap_or_else(|e| panic!("{what}: {e}"));
            assert!(rules[0].path.starts_with("a/"), "{what}: {rules:?}");
            assert!(
                rules[0].allows(if what.starts_with("parameters") {
                    "create"
                } else {
                    "read"
                }),
                "{what}: {rules:?}"
            );
        }
        let rules = parse_policy(HCL1_POLICIES[0].1).unwrap();
        assert_eq!(
            rules[0].capabilities,
            ["read", "create", "read", "update", "delete", "list"]
        );
    }

    /// Why this module has its own HCL reader: hcl-rs 0.20 (an HCL 2 parser) rejects every one
    /// of the HCL 1 policies above that Vault accepts. Should this test start failing, hcl-rs
    /// has learnt them, and replacing the reader is worth another look.
    #[test]
    fn hcl_rs_rejects_hcl1_policies_vault_accepts() {
        for (what, text) in HCL1_POLICIES {
            assert!(hcl::parse(text).is_err(), "hcl-rs now reads {what}: {text}");
        }
        // What it does read, it reads like Vault: the examples above in HCL 2's common subset.
        let body = hcl::parse("path \"database/creds/+\" {\n  capabilities = [\"read\"]\n}\n").unwrap();
        let block = body.blocks().next().unwrap();
        assert_eq!(block.labels()[0].as_str(), "database/creds/+");
    }

    #[test]
    fn json_policies_parse() {
        let rules =
            parse_policy(r#"{"path": {"secret/data/a": {"capabilities": ["read"]}, "b/*": {"policy": "write"}}}"#)
                .unwrap();
        assert_eq!(rules.len(), 2);
        assert!(rules.iter().any(|r| r.path == "b/*" && r.allows("update")));
    }
}
