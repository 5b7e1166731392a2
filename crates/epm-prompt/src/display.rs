//! Making untrusted text safe to show.

/// The most characters of one untrusted string that are shown.
pub const MAX_SHOWN_CHARS: usize = 2000;

/// `text` as it may be shown in a terminal or a dialog: control characters
/// (but new line and tab), escape sequences and bidirectional overrides are
/// written as `\u{…}`, and over [`MAX_SHOWN_CHARS`] it is cut with `…`.
///
/// ```
/// use epm_prompt::display::shown;
/// assert_eq!(shown("nc\u{1b}[2J"), "nc\\u{1b}[2J");
/// assert_eq!(shown("evil\u{202e}fdp.app"), "evil\\u{202e}fdp.app");
/// assert_eq!(shown("Ask IT first.\nTicket 42"), "Ask IT first.\nTicket 42");
/// ```
pub fn shown(text: &str) -> String {
    let mut out = String::with_capacity(text.len().min(MAX_SHOWN_CHARS * 4));
    for (count, c) in text.chars().enumerate() {
        if count == MAX_SHOWN_CHARS {
            out.push('…');
            break;
        }
        if is_unsafe(c) {
            out.push_str(&format!("\\u{{{:x}}}", c as u32));
        } else {
            out.push(c);
        }
    }
    out
}

/// One line: like [`shown`], with new lines and tabs escaped too, for a
/// title or a single terminal line.
pub fn shown_line(text: &str) -> String {
    shown(text).replace('\n', "\\n").replace('\t', "\\t")
}

fn is_unsafe(c: char) -> bool {
    (c.is_control() && c != '\n' && c != '\t')
        || matches!(c, '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}' | '\u{200E}' | '\u{200F}')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nothing_interpretable_survives() {
        let hostile = "\u{1b}]0;title\u{7}\u{9b}31m\r\u{0}\u{2066}x";
        let out = shown(hostile);
        assert!(!out.chars().any(is_unsafe), "{out:?}");
        assert_eq!(shown_line("a\nb\tc"), "a\\nb\\tc");
    }

    #[test]
    fn long_text_is_cut() {
        let out = shown(&"x".repeat(MAX_SHOWN_CHARS + 10));
        assert_eq!(out.chars().count(), MAX_SHOWN_CHARS + 1);
        assert!(out.ends_with('…'));
    }
}
