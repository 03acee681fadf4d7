//! What in a client's SQL leaves state on its server beyond the
//! transaction, which transaction pooling cannot carry to the next
//! server: `SET` (not `SET LOCAL`), `RESET`, `LISTEN`, SQL `PREPARE`, a
//! `WITH HOLD` cursor, a temporary table, `LOAD`, a session advisory
//! lock, `set_config`. A client that sends any of it is pinned to its
//! server for the rest of its session; nothing it set is seen by
//! another client.
//!
//! The scan reads each statement's first words, outside quotes, dollar
//! quotes and comments; it never parses SQL. It errs towards pinning:
//! a query it cannot read whole (over the size it inspects) pins too.

/// Why a client was pinned to its server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pin {
    Set,
    Listen,
    Prepare,
    Cursor,
    TempTable,
    Load,
    AdvisoryLock,
    /// A message too long to inspect.
    Unread,
    /// `DISCARD ALL` or `DEALLOCATE ALL` sent on to the server (inside
    /// a larger query, or by a pinned client).
    Discard,
    /// The server answered what rolegate did not expect.
    Unsure,
}

impl Pin {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Set => "set",
            Self::Listen => "listen",
            Self::Prepare => "prepare",
            Self::Cursor => "with_hold_cursor",
            Self::TempTable => "temp_table",
            Self::Load => "load",
            Self::AdvisoryLock => "advisory_lock",
            Self::Unread => "unread",
            Self::Discard => "discard",
            Self::Unsure => "unsure",
        }
    }
}

/// What a query asks of the session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Effect {
    /// Nothing beyond its transaction.
    None,
    /// Session state: the client must keep its server.
    Pins(Pin),
    /// The whole query is one `DISCARD ALL` or `DEALLOCATE ALL` (the
    /// command tag): its statements are forgotten (rolegate answers it
    /// for an unpinned client, which has nothing else on any server).
    Forget(&'static str),
}

/// What `sql` (a Query's or a Parse's text, NUL excluded) does to the
/// session.
pub fn effect(sql: &[u8]) -> Effect {
    let statements = statements(sql);
    let mut pin = None;
    for words in &statements {
        if let Some(found) = pins(words) {
            pin.get_or_insert(found);
        }
    }
    if let Some(pin) = function_pin(sql) {
        return Effect::Pins(pin);
    }
    match (pin, statements.as_slice()) {
        (None, [only]) if forgets(only) => Effect::Forget(if only[0] == "DISCARD" {
            "DISCARD ALL"
        } else {
            "DEALLOCATE ALL"
        }),
        (None, many) if many.iter().any(forgets) => Effect::Pins(Pin::Discard),
        (Some(pin), _) => Effect::Pins(pin),
        (None, _) => Effect::None,
    }
}

/// The first words of a statement, upper-cased; a few are enough.
type Words = Vec<String>;
const WORDS: usize = 10;

fn pins(words: &Words) -> Option<Pin> {
    let word = |i: usize| words.get(i).map(String::as_str).unwrap_or("");
    match word(0) {
        "SET" => match word(1) {
            "LOCAL" | "TRANSACTION" | "CONSTRAINTS" => None,
            _ => Some(Pin::Set),
        },
        "RESET" => Some(Pin::Set),
        "LISTEN" => Some(Pin::Listen),
        "PREPARE" if word(1) != "TRANSACTION" => Some(Pin::Prepare),
        "DECLARE" if words.iter().any(|w| w == "HOLD") => Some(Pin::Cursor),
        "CREATE" => {
            let temp = |w: &str| w == "TEMP" || w == "TEMPORARY";
            let local = matches!(word(1), "LOCAL" | "GLOBAL");
            (temp(word(1)) || (local && temp(word(2)))).then_some(Pin::TempTable)
        }
        "LOAD" => Some(Pin::Load),
        _ => None,
    }
}

fn forgets(words: &Words) -> bool {
    let word = |i: usize| words.get(i).map(String::as_str).unwrap_or("");
    match word(0) {
        "DISCARD" => word(1) == "ALL" && words.len() == 2,
        "DEALLOCATE" => {
            (word(1) == "ALL" && words.len() == 2)
                || (word(1) == "PREPARE" && word(2) == "ALL" && words.len() == 3)
        }
        _ => false,
    }
}

/// Functions that change the session wherever they are called.
fn function_pin(sql: &[u8]) -> Option<Pin> {
    // Compared in place: this runs for every query, and a copy of the
    // text would be an allocation each time.
    let has = |needle: &[u8]| {
        sql.windows(needle.len())
            .any(|w| w.eq_ignore_ascii_case(needle))
    };
    if has(b"set_config") {
        return Some(Pin::Set);
    }
    // pg_advisory_xact_lock and friends end with the transaction.
    (has(b"pg_advisory_lock") || has(b"pg_try_advisory_lock")).then_some(Pin::AdvisoryLock)
}

/// Each statement's first words (a statement without words is left
/// out); `words.len()` says how many there were, up to [`WORDS`] + 1 so
/// that "exactly these words" can be told.
fn statements(sql: &[u8]) -> Vec<Words> {
    let mut all = Vec::new();
    let mut words: Words = Vec::new();
    let mut word = String::new();
    let mut i = 0;
    let end_word = |word: &mut String, words: &mut Words| {
        if !word.is_empty() {
            if words.len() <= WORDS {
                words.push(std::mem::take(word));
            } else {
                word.clear();
            }
        }
    };
    while i < sql.len() {
        let b = sql[i];
        match b {
            b'\'' | b'"' => {
                end_word(&mut word, &mut words);
                // A quoted literal or identifier: a word of its own.
                let escapes = b == b'\'' && i > 0 && matches!(sql[i - 1], b'e' | b'E');
                i = skip_quoted(sql, i, b, escapes);
                if words.len() <= WORDS {
                    words.push(String::from("'"));
                }
                continue;
            }
            b'-' if sql.get(i + 1) == Some(&b'-') => {
                end_word(&mut word, &mut words);
                while i < sql.len() && sql[i] != b'\n' {
                    i += 1;
                }
                continue;
            }
            b'/' if sql.get(i + 1) == Some(&b'*') => {
                end_word(&mut word, &mut words);
                i = skip_block_comment(sql, i);
                continue;
            }
            b'$' if word.is_empty() => {
                if let Some(after) = skip_dollar_quoted(sql, i) {
                    end_word(&mut word, &mut words);
                    i = after;
                    if words.len() <= WORDS {
                        words.push(String::from("$"));
                    }
                    continue;
                }
                word.push('$');
            }
            b';' => {
                end_word(&mut word, &mut words);
                if !words.is_empty() {
                    all.push(std::mem::take(&mut words));
                }
            }
            b if b.is_ascii_alphanumeric() || b == b'_' || b >= 0x80 => {
                word.push(char::from(b.to_ascii_uppercase()));
            }
            _ => end_word(&mut word, &mut words),
        }
        i += 1;
    }
    end_word(&mut word, &mut words);
    if !words.is_empty() {
        all.push(words);
    }
    all
}

/// Past a quoted string starting at `start`; `''` (and with `escapes`,
/// a backslash) keeps it going. An unclosed quote runs to the end.
fn skip_quoted(sql: &[u8], start: usize, quote: u8, escapes: bool) -> usize {
    let mut i = start + 1;
    while i < sql.len() {
        if escapes && sql[i] == b'\\' {
            i += 2;
            continue;
        }
        if sql[i] == quote {
            if sql.get(i + 1) == Some(&quote) {
                i += 2;
                continue;
            }
            return i + 1;
        }
        i += 1;
    }
    sql.len()
}

/// Past a block comment (they nest in PostgreSQL).
fn skip_block_comment(sql: &[u8], start: usize) -> usize {
    let mut depth = 0usize;
    let mut i = start;
    while i < sql.len() {
        if sql[i] == b'/' && sql.get(i + 1) == Some(&b'*') {
            depth += 1;
            i += 2;
        } else if sql[i] == b'*' && sql.get(i + 1) == Some(&b'/') {
            depth -= 1;
            i += 2;
            if depth == 0 {
                return i;
            }
        } else {
            i += 1;
        }
    }
    sql.len()
}

/// Past a dollar-quoted string (`$tag$ ... $tag$`) starting at `start`,
/// or `None` when `$` does not open one (a parameter like `$1`).
fn skip_dollar_quoted(sql: &[u8], start: usize) -> Option<usize> {
    let tag_end = sql[start + 1..]
        .iter()
        .position(|&b| !(b.is_ascii_alphanumeric() || b == b'_' || b >= 0x80))
        .map(|n| start + 1 + n)?;
    if sql[tag_end] != b'$' || sql.get(start + 1).is_some_and(u8::is_ascii_digit) {
        return None;
    }
    let tag = &sql[start..=tag_end];
    let body = &sql[tag_end + 1..];
    let close = body.windows(tag.len()).position(|w| w == tag);
    Some(close.map_or(sql.len(), |n| tag_end + 1 + n + tag.len()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn of(sql: &str) -> Effect {
        effect(sql.as_bytes())
    }

    #[test]
    fn session_state_pins_and_transaction_state_does_not() {
        for (sql, pin) in [
            ("SET search_path TO app", Pin::Set),
            ("set TimeZone = 'UTC'", Pin::Set),
            ("SET SESSION statement_timeout = 5", Pin::Set),
            ("select 1; reset all", Pin::Set),
            ("LISTEN jobs", Pin::Listen),
            ("PREPARE q AS SELECT 1", Pin::Prepare),
            ("DECLARE c CURSOR WITH HOLD FOR SELECT 1", Pin::Cursor),
            ("create temp table t (a int)", Pin::TempTable),
            ("CREATE LOCAL TEMPORARY TABLE t (a int)", Pin::TempTable),
            ("LOAD 'auto_explain'", Pin::Load),
            ("select set_config('search_path', 'x', false)", Pin::Set),
            ("SELECT pg_advisory_lock(1)", Pin::AdvisoryLock),
            ("begin; select 1; discard all", Pin::Discard),
            ("/* hi */ -- there\n SET x = 1", Pin::Set),
        ] {
            assert_eq!(of(sql), Effect::Pins(pin), "{sql}");
        }
        for sql in [
            "SET LOCAL search_path TO app",
            "SET TRANSACTION ISOLATION LEVEL SERIALIZABLE",
            "SET CONSTRAINTS ALL DEFERRED",
            "UPDATE t SET a = 1",
            "select 'SET x = 1'",
            "select $$; SET x = 1$$",
            "select $body$ ; LISTEN x $body$, $1",
            "select \"set\" from t; -- set x = 1",
            "select E'it\\'s; set x=1'",
            "DECLARE c CURSOR FOR SELECT 1",
            "PREPARE TRANSACTION 'x'",
            "CREATE TABLE temp (a int)",
            "SELECT pg_advisory_xact_lock(1)",
            "/* unclosed",
            "",
            ";;",
        ] {
            assert_eq!(of(sql), Effect::None, "{sql}");
        }
    }

    #[test]
    fn a_lone_discard_or_deallocate_all_is_forgotten() {
        for (sql, tag) in [
            ("DISCARD ALL", "DISCARD ALL"),
            ("discard all;", "DISCARD ALL"),
            ("DEALLOCATE ALL", "DEALLOCATE ALL"),
            ("deallocate prepare all", "DEALLOCATE ALL"),
        ] {
            assert_eq!(of(sql), Effect::Forget(tag), "{sql}");
        }
        assert_eq!(of("DEALLOCATE s1"), Effect::None);
        assert_eq!(of("DISCARD TEMP"), Effect::None);
    }
}
