//! The `auth_file`: PgBouncer's `userlist.txt` format, so an existing file
//! can be pointed at as it is. One role per line, `"name" "secret"`, each
//! field in double quotes with `""` for a quote inside; anything after the
//! second field is ignored, as PgBouncer does. Blank lines and lines that
//! start with `;` or `#` are comments.
//!
//! Every secret must be a SCRAM-SHA-256 or md5 secret (see
//! [`super::secret`]); a plaintext password is an error naming its line,
//! never a silent fallback.

use std::collections::HashMap;

use super::secret::{Secret, SecretError};

/// Why a userlist could not be read, with the 1-based line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {what}")]
pub struct UserlistError {
    pub line: usize,
    pub what: String,
}

/// The roles of a userlist and their secrets.
pub fn parse(text: &str) -> Result<HashMap<String, Secret>, UserlistError> {
    let mut roles = HashMap::new();
    for (index, line) in text.lines().enumerate() {
        let error = |what: String| UserlistError {
            line: index + 1,
            what,
        };
        let trimmed = line.trim_start();
        if trimmed.is_empty() || trimmed.starts_with(';') || trimmed.starts_with('#') {
            continue;
        }
        let (name, rest) = quoted(trimmed).map_err(|what| error(what.into()))?;
        let (secret, _) = quoted(rest.trim_start()).map_err(|what| error(what.into()))?;
        if name.is_empty() {
            return Err(error("the role name is empty".into()));
        }
        let secret = Secret::parse(&secret)
            .map_err(|e: SecretError| error(format!("the secret of role {name:?} is {e}")))?;
        if roles.insert(name.clone(), secret).is_some() {
            return Err(error(format!("role {name:?} is listed twice")));
        }
    }
    Ok(roles)
}

/// A double-quoted field at the start of `text` and what follows it.
fn quoted(text: &str) -> Result<(String, &str), &'static str> {
    let mut chars = text.char_indices();
    if chars.next().map(|(_, c)| c) != Some('"') {
        return Err("expected a field in double quotes");
    }
    let mut field = String::new();
    while let Some((i, c)) = chars.next() {
        if c != '"' {
            field.push(c);
            continue;
        }
        if text[i + 1..].starts_with('"') {
            field.push('"');
            chars.next();
            continue;
        }
        return Ok((field, &text[i + 1..]));
    }
    Err("a field's closing quote is missing")
}

#[cfg(test)]
mod tests {
    use super::*;

    const MD5: &str = "md5bc8b3cbf7ab5a5b0b1bc2e1b0c4b5f2f";

    #[test]
    fn reads_pgbouncer_lines() {
        let text = format!(
            "; written by hand\n\n\"app\" \"{MD5}\"\n  \"we\"\"ird\" \"{MD5}\" \"ignored\"\n# done\n"
        );
        let roles = parse(&text).expect("parses");
        assert_eq!(roles.len(), 2);
        assert!(roles.contains_key("app"));
        assert!(roles.contains_key("we\"ird"));
    }

    #[test]
    fn names_the_line_of_what_is_wrong() {
        let cases = [
            ("\"app\" \"app\"", 1, "plaintext"),
            (&*format!("\n\"app\" {MD5}"), 2, "double quotes"),
            ("\"app", 1, "closing quote"),
            (&*format!("\"\" \"{MD5}\""), 1, "empty"),
            (&*format!("\"a\" \"{MD5}\"\n\"a\" \"{MD5}\""), 2, "twice"),
        ];
        for (text, line, words) in cases {
            let e = parse(text).expect_err(text);
            assert_eq!(e.line, line, "{text}: {e}");
            assert!(e.to_string().contains(words), "{text}: {e}");
        }
    }
}
