//! Policy documents shown on a page: JSON syntax highlighting done here on
//! the server (no script library in the browser), where each rule starts
//! (so a validation error is shown at its rule), and a line diff against
//! the stored version.

use maud::{Markup, html};

/// One highlighted piece of a line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Token {
    /// CSS class: `key`, `str`, `num`, `lit` (true/false/null), `punct`, or
    /// empty for whitespace and anything else.
    pub class: &'static str,
    /// The text, as in the document.
    pub text: String,
}

/// Splits a JSON document into lines of classified tokens. Never fails:
/// malformed input is shown as it is, unclassified.
pub fn tokenize(document: &str) -> Vec<Vec<Token>> {
    let mut lines = vec![Vec::new()];
    let chars: Vec<char> = document.chars().collect();
    let mut i = 0;
    let push = |lines: &mut Vec<Vec<Token>>, class: &'static str, text: String| {
        if let Some(line) = lines.last_mut() {
            line.push(Token { class, text });
        }
    };
    while i < chars.len() {
        let c = chars[i];
        match c {
            '\n' => {
                lines.push(Vec::new());
                i += 1;
            }
            '"' => {
                let start = i;
                i += 1;
                while i < chars.len() && chars[i] != '"' && chars[i] != '\n' {
                    if chars[i] == '\\' {
                        i += 1;
                    }
                    i += 1;
                }
                i = (i + 1).min(chars.len());
                let text: String = chars[start..i].iter().collect();
                // A key is a string followed by a colon.
                let mut j = i;
                while j < chars.len() && chars[j].is_whitespace() && chars[j] != '\n' {
                    j += 1;
                }
                let class = if chars.get(j) == Some(&':') {
                    "key"
                } else {
                    "str"
                };
                push(&mut lines, class, text);
            }
            '{' | '}' | '[' | ']' | ':' | ',' => {
                push(&mut lines, "punct", c.to_string());
                i += 1;
            }
            c if c == '-' || c.is_ascii_digit() => {
                let start = i;
                while i < chars.len()
                    && (chars[i].is_ascii_alphanumeric() || "+-.".contains(chars[i]))
                {
                    i += 1;
                }
                push(&mut lines, "num", chars[start..i].iter().collect());
            }
            c if c.is_ascii_alphabetic() => {
                let start = i;
                while i < chars.len() && chars[i].is_ascii_alphabetic() {
                    i += 1;
                }
                push(&mut lines, "lit", chars[start..i].iter().collect());
            }
            _ => {
                let start = i;
                while i < chars.len() && !"\n\"{}[]:,-".contains(chars[i]) && {
                    let c = chars[i];
                    !(c.is_ascii_alphanumeric())
                } {
                    i += 1;
                }
                if i == start {
                    i += 1;
                }
                push(&mut lines, "", chars[start..i].iter().collect());
            }
        }
    }
    lines
}

/// A line of tokens as HTML (escaped by maud).
pub fn render_line(tokens: &[Token]) -> Markup {
    html! {
        @for token in tokens {
            @if token.class.is_empty() { (token.text) } @else { span class=(token.class) { (token.text) } }
        }
    }
}

/// Where each rule is: (0-based line of its `"id"`, or of its opening
/// brace, its id if it has one, its position as `#N`). Rules are the
/// objects in the top level's arrays (`rules`, `elevation`, …).
pub fn rule_lines(lines: &[Vec<Token>]) -> Vec<(usize, Option<String>, String)> {
    let mut found = Vec::new();
    let mut depth = 0usize;
    let mut array_key: Option<String> = None;
    let mut last_key: Option<String> = None;
    let mut index_in_array = 0usize;
    let mut current: Option<usize> = None;
    let mut expect_id = false;
    for (n, line) in lines.iter().enumerate() {
        for token in line {
            match (token.class, token.text.as_str()) {
                ("punct", "{") => {
                    depth += 1;
                    if depth == 3 && array_key.is_some() {
                        found.push((
                            n,
                            None,
                            match array_key.as_deref() {
                                Some("rules") | None => format!("#{index_in_array}"),
                                Some(key) => format!("{key}#{index_in_array}"),
                            },
                        ));
                        current = Some(found.len() - 1);
                        index_in_array += 1;
                    }
                }
                ("punct", "[") => {
                    depth += 1;
                    if depth == 2 {
                        array_key = last_key.clone();
                        index_in_array = 0;
                    }
                }
                ("punct", "}" | "]") => {
                    if depth == 3 {
                        current = None;
                    }
                    if depth == 2 {
                        array_key = None;
                    }
                    depth = depth.saturating_sub(1);
                }
                ("key", key) => {
                    let key = key.trim_matches('"').to_owned();
                    expect_id = depth == 3 && key == "id";
                    last_key = Some(key);
                }
                ("str", value) if expect_id => {
                    if let Some(index) = current {
                        let entry = &mut found[index];
                        entry.0 = n;
                        entry.1 = serde_json::from_str::<String>(value).ok();
                    }
                    expect_id = false;
                }
                ("punct", ",") => expect_id = false,
                _ => {}
            }
        }
    }
    found
}

/// The line a validation error belongs at: its rule's (by id, or by
/// `#N` position in `rules`), or `None` for the document as a whole.
pub fn line_of_rule(rules: &[(usize, Option<String>, String)], rule: &str) -> Option<usize> {
    rules
        .iter()
        .find(|(_, id, position)| id.as_deref() == Some(rule) || position == rule)
        .map(|(line, _, _)| *line)
}

/// One line of a diff: `' '`, `'-'` or `'+'`, the old and new line
/// numbers, and the text.
pub type DiffLine = (char, Option<usize>, Option<usize>, String);

/// The lines that differ between `old` and `new`, with three lines of
/// context around each change; `None` between hunks.
pub fn diff(old: &str, new: &str) -> Vec<Option<DiffLine>> {
    let diff = similar::TextDiff::from_lines(old, new);
    let mut out = Vec::new();
    for (index, group) in diff.grouped_ops(3).iter().enumerate() {
        if index > 0 {
            out.push(None);
        }
        for op in group {
            for change in diff.iter_changes(op) {
                let sign = match change.tag() {
                    similar::ChangeTag::Equal => ' ',
                    similar::ChangeTag::Delete => '-',
                    similar::ChangeTag::Insert => '+',
                };
                out.push(Some((
                    sign,
                    change.old_index().map(|i| i + 1),
                    change.new_index().map(|i| i + 1),
                    change.value().trim_end_matches('\n').to_owned(),
                )));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const DOCUMENT: &str = r#"{
  "version": 1,
  "default_action": "allow",
  "rules": [
    {
      "id": "no-nc",
      "action": "deny",
      "match": {"name": "nc"}
    },
    {"action": "allow", "match": {"name": "<script>"}}
  ]
}"#;

    #[test]
    fn tokens_are_classified_and_markup_is_escaped() {
        let lines = tokenize(DOCUMENT);
        assert_eq!(lines.len(), DOCUMENT.lines().count());
        let html = render_line(&lines[9]).into_string();
        assert!(
            html.contains(r#"<span class="key">&quot;action&quot;</span>"#),
            "{html}"
        );
        assert!(html.contains("&lt;script&gt;"), "{html}");
        assert!(!html.contains("<script>"), "{html}");
        let text: String = lines
            .iter()
            .map(|l| l.iter().map(|t| t.text.as_str()).collect::<String>())
            .collect::<Vec<_>>()
            .join("\n");
        assert_eq!(text, DOCUMENT, "nothing is lost");
    }

    #[test]
    fn rules_are_found_by_id_and_position() {
        let rules = rule_lines(&tokenize(DOCUMENT));
        assert_eq!(line_of_rule(&rules, "no-nc"), Some(5));
        assert_eq!(line_of_rule(&rules, "#1"), Some(9));
        assert_eq!(line_of_rule(&rules, "other"), None);
    }

    #[test]
    fn a_diff_shows_the_changed_lines() {
        let new = DOCUMENT.replace("\"deny\"", "\"approve\"");
        let lines: Vec<DiffLine> = diff(DOCUMENT, &new).into_iter().flatten().collect();
        assert!(lines.iter().any(|l| l.0 == '-' && l.3.contains("deny")));
        assert!(lines.iter().any(|l| l.0 == '+' && l.3.contains("approve")));
    }
}
