//! URL and body templates: `{user}`, `{users}`, `{ts}`, `{id}` filled per message without re-parsing.

/// One piece of a parsed template.
#[derive(Debug, Clone, PartialEq)]
enum Part {
    Text(String),
    User,
    Users,
    Ts,
    Id,
}

/// A template parsed once; `render` only concatenates.
#[derive(Debug, Clone)]
pub struct Template {
    parts: Vec<Part>,
    len_hint: usize,
}

/// The values a template may ask for.
pub struct Fill<'a> {
    pub user: &'a str,
    /// A JSON array of the target users (multicast).
    pub users: &'a str,
    /// Send time, microseconds since the Unix epoch.
    pub ts: u64,
    /// The message's id, unique within a run.
    pub id: u64,
}

impl Template {
    pub fn parse(text: &str) -> Self {
        const KEYS: [(&str, Part); 4] = [
            ("{users}", Part::Users),
            ("{user}", Part::User),
            ("{ts}", Part::Ts),
            ("{id}", Part::Id),
        ];
        let mut parts = Vec::new();
        let mut literal = String::new();
        let mut rest = text;
        'scan: while !rest.is_empty() {
            for (key, part) in &KEYS {
                if let Some(after) = rest.strip_prefix(key) {
                    if !literal.is_empty() {
                        parts.push(Part::Text(std::mem::take(&mut literal)));
                    }
                    parts.push(part.clone());
                    rest = after;
                    continue 'scan;
                }
            }
            let mut chars = rest.chars();
            if let Some(c) = chars.next() {
                literal.push(c);
            }
            rest = chars.as_str();
        }
        if !literal.is_empty() {
            parts.push(Part::Text(literal));
        }
        Self {
            parts,
            len_hint: text.len() + 32,
        }
    }

    pub fn render(&self, fill: &Fill<'_>) -> String {
        use std::fmt::Write;
        let mut out = String::with_capacity(self.len_hint + fill.users.len());
        for part in &self.parts {
            match part {
                Part::Text(text) => out.push_str(text),
                Part::User => out.push_str(fill.user),
                Part::Users => out.push_str(fill.users),
                Part::Ts => {
                    let _ = write!(out, "{}", fill.ts);
                }
                Part::Id => {
                    let _ = write!(out, "{}", fill.id);
                }
            }
        }
        out
    }
}

/// Reads `"key":<digits>` out of a frame without parsing the JSON around it,
/// so the same probe works on Herald's envelope and on a peer's raw body.
pub fn probe_number(frame: &[u8], key: &[u8]) -> Option<u64> {
    let at = frame.windows(key.len()).position(|w| w == key)? + key.len();
    let digits = frame[at..]
        .iter()
        .skip_while(|b| **b == b' ')
        .take_while(|b| b.is_ascii_digit());
    let mut value: u64 = 0;
    let mut any = false;
    for d in digits {
        value = value.checked_mul(10)?.checked_add(u64::from(d - b'0'))?;
        any = true;
    }
    any.then_some(value)
}

/// The probe keys the default bodies carry: send time and message id.
pub const TS_KEY: &[u8] = b"\"hb_t\":";
pub const ID_KEY: &[u8] = b"\"hb_n\":";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_every_placeholder() {
        let t =
            Template::parse(r#"{"users":{users},"data":{"u":"{user}","hb_t":{ts},"hb_n":{id}}}"#);
        let out = t.render(&Fill {
            user: "u7",
            users: r#"["u7","u8"]"#,
            ts: 12,
            id: 3,
        });
        assert_eq!(
            out,
            r#"{"users":["u7","u8"],"data":{"u":"u7","hb_t":12,"hb_n":3}}"#
        );
    }

    #[test]
    fn probes_numbers_inside_any_envelope() {
        let frame = br#"{"type":"notification","seq":9,"data":{"hb_t": 1700,"hb_n":42},"ts":"x"}"#;
        assert_eq!(probe_number(frame, TS_KEY), Some(1700));
        assert_eq!(probe_number(frame, ID_KEY), Some(42));
        assert_eq!(probe_number(b"{\"hb_n\":\"x\"}", ID_KEY), None);
        assert_eq!(probe_number(b"{}", ID_KEY), None);
    }
}
