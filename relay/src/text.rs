//! Rules for text that people are shown: display names, chat messages, invitation
//! comments, offered file names; and how the review tools print text that reached a
//! recording anyway.
//!
//! Pure functions, no IO. The session core ([`crate::session`]) and the file-transfer
//! core ([`crate::transfer`]) call the `clean_*` functions on every input; the review
//! CLI calls [`escape_line`] and [`transcript_text`] on every name and message it
//! prints. Character properties come from `unicode-properties` (general categories)
//! and normalization from `unicode-normalization`; the few code points named here are
//! the Unicode `Bidi_Control` set and blank-looking fillers whose category says
//! "letter".
//!
//! The rules, in short:
//!
//! - **Names** (display names, file names): no control characters, no format
//!   characters (category `Cf`: bidi controls, zero-width spaces, byte-order marks, tag
//!   characters, …) except the zero-width joiner and non-joiner that emoji and some
//!   scripts need, at least one visible character; display names are trimmed and
//!   normalized to NFC.
//! - **Messages** (chat, comments): newline and tab are the only control characters;
//!   no bidi embeddings, overrides or isolates (they reorder the rest of a line), no
//!   tag characters (invisible text), no line or paragraph separators; normalized to
//!   NFC. Bidi *marks* (U+200E, U+200F, U+061C) stay: right-to-left writers need them
//!   and they reorder nothing beyond themselves.

use unicode_normalization::UnicodeNormalization;
use unicode_properties::{GeneralCategory, GeneralCategoryGroup, UnicodeGeneralCategory};

/// Why a piece of text was refused. [`TextRule::message`] says it to the sender.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TextRule {
    /// Nothing (or only whitespace).
    Empty,
    /// Longer than allowed (after normalization).
    TooLong,
    /// A control character (other than newline and tab in messages).
    Control,
    /// A bidirectional control character (U+202A–U+202E, U+2066–U+2069, and in names
    /// also U+200E, U+200F, U+061C).
    Bidi,
    /// A Unicode tag character (U+E0000–U+E007F).
    Tag,
    /// Another invisible formatting character (zero-width space, byte-order mark, …).
    Invisible,
    /// Nothing visible at all (only whitespace, marks and invisible characters).
    NothingVisible,
    /// A line or paragraph separator (U+2028, U+2029).
    LineSeparator,
}

impl TextRule {
    /// Every rule, in metric order.
    pub const ALL: [TextRule; 8] = [
        TextRule::Empty,
        TextRule::TooLong,
        TextRule::Control,
        TextRule::Bidi,
        TextRule::Tag,
        TextRule::Invisible,
        TextRule::NothingVisible,
        TextRule::LineSeparator,
    ];

    /// Metric label (`rule` of `relay_text_refused_total`).
    pub fn as_str(self) -> &'static str {
        match self {
            TextRule::Empty => "empty",
            TextRule::TooLong => "too_long",
            TextRule::Control => "control",
            TextRule::Bidi => "bidi",
            TextRule::Tag => "tag",
            TextRule::Invisible => "invisible",
            TextRule::NothingVisible => "nothing_visible",
            TextRule::LineSeparator => "line_separator",
        }
    }

    /// What is wrong with the `field` ("name", "chat text", …), for the sender.
    pub fn message(self, field: Field) -> &'static str {
        use Field::*;
        use TextRule::*;
        match (field, self) {
            (Name, Empty) => "name must not be empty",
            (Name, TooLong) => "name must be at most 64 characters",
            (Name, Control) => "name must not contain control characters",
            (Name, Bidi) => "name must not contain bidirectional control characters",
            (Name, Tag) => "name must not contain Unicode tag characters",
            (Name, Invisible) => "name must not contain invisible formatting characters",
            (Name, NothingVisible) => "name must contain a visible character",
            (Name, LineSeparator) => "name must not contain line separators",
            (Chat, Empty) => "chat text must not be empty",
            (Chat, TooLong) => "chat text must be at most 4000 characters",
            (Chat, Control) => {
                "chat text must not contain control characters other than newline and tab"
            }
            (Chat, Bidi) => "chat text must not contain bidirectional embeddings or overrides",
            (Chat, Tag) => "chat text must not contain Unicode tag characters",
            (Chat, Invisible | NothingVisible) => "chat text must contain a visible character",
            (Chat, LineSeparator) => "chat text must not contain U+2028 or U+2029",
            (Comment, Empty) => "comment must not be empty",
            (Comment, TooLong) => "comment must be at most 500 characters",
            (Comment, Control) => {
                "comment must not contain control characters other than newline and tab"
            }
            (Comment, Bidi) => "comment must not contain bidirectional embeddings or overrides",
            (Comment, Tag) => "comment must not contain Unicode tag characters",
            (Comment, Invisible | NothingVisible) => "comment must contain a visible character",
            (Comment, LineSeparator) => "comment must not contain U+2028 or U+2029",
        }
    }
}

/// Which free-text field a [`TextRule`] message is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Field {
    /// A display name.
    Name,
    /// A chat message or agent note.
    Chat,
    /// An invitation comment.
    Comment,
}

impl Field {
    /// Every field, in metric order.
    pub const ALL: [Field; 3] = [Field::Name, Field::Chat, Field::Comment];

    /// Metric label (`field` of `relay_text_refused_total`).
    pub fn as_str(self) -> &'static str {
        match self {
            Field::Name => "name",
            Field::Chat => "chat",
            Field::Comment => "comment",
        }
    }
}

/// Zero-width joiner and non-joiner: format characters that emoji sequences and
/// several scripts (Persian, Indic) need inside words.
const JOINERS: [char; 2] = ['\u{200C}', '\u{200D}'];

/// Characters that render blank although their category is letter or symbol (Hangul
/// fillers, the blank Braille pattern): "invisible" names are made of these too.
const BLANK_LOOKING: [char; 5] = ['\u{115F}', '\u{1160}', '\u{3164}', '\u{FFA0}', '\u{2800}'];

/// Whether `c` is one of the Unicode `Bidi_Control` characters.
pub fn is_bidi_control(c: char) -> bool {
    matches!(c, '\u{061C}' | '\u{200E}' | '\u{200F}') || is_bidi_embedding(c)
}

/// Bidi embeddings, overrides and isolates (and their terminators): the controls that
/// reorder everything after them up to the end of the paragraph.
fn is_bidi_embedding(c: char) -> bool {
    matches!(c, '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}')
}

/// Whether `c` is a Unicode tag character (U+E0000–U+E007F): invisible copies of ASCII.
pub fn is_tag(c: char) -> bool {
    matches!(c, '\u{E0000}'..='\u{E007F}')
}

fn is_format(c: char) -> bool {
    c.general_category() == GeneralCategory::Format
}

/// Whether `c` shows as something on screen: a letter, number, punctuation or symbol
/// that is not a blank-looking filler.
pub fn is_visible(c: char) -> bool {
    !c.is_whitespace()
        && !BLANK_LOOKING.contains(&c)
        && matches!(
            c.general_category_group(),
            GeneralCategoryGroup::Letter
                | GeneralCategoryGroup::Number
                | GeneralCategoryGroup::Punctuation
                | GeneralCategoryGroup::Symbol
        )
}

/// The name rules shared by display names and file names (no trimming, no NFC).
fn check_name_chars(name: &str) -> Result<(), TextRule> {
    for c in name.chars() {
        if c.is_control() {
            return Err(TextRule::Control);
        }
        if is_bidi_control(c) {
            return Err(TextRule::Bidi);
        }
        if is_tag(c) {
            return Err(TextRule::Tag);
        }
        if matches!(c, '\u{2028}' | '\u{2029}') {
            return Err(TextRule::LineSeparator);
        }
        if is_format(c) && !JOINERS.contains(&c) {
            return Err(TextRule::Invisible);
        }
    }
    if !name.chars().any(is_visible) {
        return Err(TextRule::NothingVisible);
    }
    Ok(())
}

/// A display name as people will see it: trimmed, NFC, 1..=`max_chars` characters,
/// none of them a control, bidi control, tag or other invisible format character (the
/// zero-width joiners excepted), and at least one visible.
pub fn clean_name(name: &str, max_chars: usize) -> Result<String, TextRule> {
    let name: String = name.trim().nfc().collect();
    if name.is_empty() {
        return Err(TextRule::Empty);
    }
    if name.chars().count() > max_chars {
        return Err(TextRule::TooLong);
    }
    check_name_chars(&name)?;
    Ok(name)
}

/// Whether an offered file's name may be shown to its receivers: the name rules
/// (no control, bidi, tag or invisible format character; something visible). Not
/// normalized: the receiver gets the name as sent.
pub fn check_file_name(name: &str) -> Result<(), TextRule> {
    if name.trim().is_empty() {
        return Err(TextRule::Empty);
    }
    check_name_chars(name)
}

/// Whether a portal name may name a session: 1..=`max_chars` characters and the name
/// rules (it is shown to agents and names the recordings' folder). Not normalized: it
/// must match the agent's token as it is.
pub fn check_portal(portal: &str, max_chars: usize) -> Result<(), TextRule> {
    if portal.trim().is_empty() {
        return Err(TextRule::Empty);
    }
    if portal.chars().count() > max_chars {
        return Err(TextRule::TooLong);
    }
    check_name_chars(portal)
}

/// A chat message or comment as people will see it: NFC, 1..=`max_chars` characters,
/// not only whitespace; newline and tab are the only control characters; no bidi
/// embeddings, overrides or isolates, tag characters or line separators.
pub fn clean_message(text: &str, max_chars: usize) -> Result<String, TextRule> {
    if text.trim().is_empty() {
        return Err(TextRule::Empty);
    }
    let text: String = text.nfc().collect();
    if text.chars().count() > max_chars {
        return Err(TextRule::TooLong);
    }
    for c in text.chars() {
        if c.is_control() && c != '\n' && c != '\t' {
            return Err(TextRule::Control);
        }
        if is_bidi_embedding(c) {
            return Err(TextRule::Bidi);
        }
        if is_tag(c) {
            return Err(TextRule::Tag);
        }
        if matches!(c, '\u{2028}' | '\u{2029}') {
            return Err(TextRule::LineSeparator);
        }
    }
    if !text.chars().any(is_visible) {
        return Err(TextRule::NothingVisible);
    }
    Ok(text)
}

/// Whether the review tools show `c` as an escape: controls (tab included), bidi
/// controls, tag characters, line separators and other format characters except the
/// joiners.
fn needs_escape(c: char) -> bool {
    c.is_control()
        || is_bidi_control(c)
        || is_tag(c)
        || matches!(c, '\u{2028}' | '\u{2029}')
        || (is_format(c) && !JOINERS.contains(&c))
}

fn push_escaped(out: &mut String, c: char) {
    out.push_str(&format!("\\u{{{:x}}}", u32::from(c)));
}

/// `text` on one line for a terminal: every character that could move the cursor,
/// talk to the terminal, reorder or hide text (see [`needs_escape`]) becomes a visible
/// `\u{…}` escape, newlines included; a backslash becomes `\\` so that escapes cannot
/// be faked.
pub fn escape_line(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if c == '\\' {
            out.push_str("\\\\");
        } else if needs_escape(c) {
            push_escaped(&mut out, c);
        } else {
            out.push(c);
        }
    }
    out
}

/// The prefix of a message's continuation lines in the text transcript.
pub const CONTINUATION: &str = "    | ";

/// A message for the text transcript: its lines joined with `\n` +
/// [`CONTINUATION`], so that one message is one entry and no line of it can pass for an
/// entry of its own; a `\r\n` counts as one line break; tabs stay; every other
/// character that [`escape_line`] escapes is escaped (a lone `\r`, ESC, BEL, bidi
/// controls, …).
pub fn transcript_text(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\r' if chars.peek() == Some(&'\n') => {}
            '\n' => {
                out.push('\n');
                out.push_str(CONTINUATION);
            }
            '\t' => out.push('\t'),
            '\\' => out.push_str("\\\\"),
            c if needs_escape(c) => push_escaped(&mut out, c),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    const MAX_NAME: usize = 64;

    #[test]
    fn ordinary_names_pass_trimmed_and_in_nfc() {
        assert_eq!(clean_name("  Alice ", MAX_NAME).unwrap(), "Alice");
        assert_eq!(clean_name("José", MAX_NAME).unwrap(), "José");
        // e + combining acute becomes é.
        assert_eq!(clean_name("Jose\u{301}", MAX_NAME).unwrap(), "Jos\u{e9}");
        assert_eq!(clean_name("محمد", MAX_NAME).unwrap(), "محمد");
        assert_eq!(clean_name("李小龍", MAX_NAME).unwrap(), "李小龍");
        // An emoji ZWJ sequence and a Persian ZWNJ keep their joiners.
        assert!(clean_name("Dev 👩\u{200D}💻", MAX_NAME).is_ok());
        assert!(clean_name("می\u{200C}خواهم", MAX_NAME).is_ok());
        assert_eq!(clean_name(&"a".repeat(64), MAX_NAME).unwrap().len(), 64);
    }

    #[test]
    fn spoofing_and_hiding_names_are_refused() {
        let refused = |name: &str| clean_name(name, MAX_NAME).unwrap_err();
        assert_eq!(refused("Carol\u{202E}TNEGA"), TextRule::Bidi);
        assert_eq!(refused("Carol\u{2067}x"), TextRule::Bidi);
        assert_eq!(refused("Carol\u{200F}"), TextRule::Bidi);
        assert_eq!(refused("Carol\u{061C}"), TextRule::Bidi);
        assert_eq!(refused("Carol\u{E0041}\u{E0047}"), TextRule::Tag);
        assert_eq!(refused("\u{200B}\u{200B}"), TextRule::Invisible);
        assert_eq!(refused("\u{FEFF}"), TextRule::Invisible);
        assert_eq!(refused("Al\u{AD}ice"), TextRule::Invisible);
        assert_eq!(refused("\u{3164}\u{3164}"), TextRule::NothingVisible);
        assert_eq!(refused("\u{2800}"), TextRule::NothingVisible);
        assert_eq!(refused("\u{301}\u{301}"), TextRule::NothingVisible);
        assert_eq!(refused("\u{200D}"), TextRule::NothingVisible);
        assert_eq!(refused("   "), TextRule::Empty);
        assert_eq!(refused("a\nb"), TextRule::Control);
        assert_eq!(refused("a\u{1b}[31m"), TextRule::Control);
        assert_eq!(refused("a\u{2028}b"), TextRule::LineSeparator);
        assert_eq!(refused(&"a".repeat(65)), TextRule::TooLong);
    }

    #[test]
    fn messages_keep_newlines_and_tabs_and_refuse_other_controls() {
        assert_eq!(clean_message("hi\n\tthere", 4000).unwrap(), "hi\n\tthere");
        assert_eq!(
            clean_message("caf\u{65}\u{301}", 4000).unwrap(),
            "caf\u{e9}"
        );
        // Right-to-left marks stay; embeddings and overrides do not.
        assert!(clean_message("\u{200F}שלום", 4000).is_ok());
        let refused = |t: &str| clean_message(t, 4000).unwrap_err();
        assert_eq!(refused("a\rb"), TextRule::Control);
        assert_eq!(refused("a\u{1b}[2J"), TextRule::Control);
        assert_eq!(refused("a\u{7}"), TextRule::Control);
        assert_eq!(refused("a\0"), TextRule::Control);
        assert_eq!(refused("a\u{85}b"), TextRule::Control);
        assert_eq!(refused("a\u{202E}b"), TextRule::Bidi);
        assert_eq!(refused("a\u{2066}b"), TextRule::Bidi);
        assert_eq!(refused("a\u{E0041}"), TextRule::Tag);
        assert_eq!(refused("a\u{2029}b"), TextRule::LineSeparator);
        assert_eq!(refused("\u{200B}"), TextRule::NothingVisible);
        assert_eq!(refused(" \n "), TextRule::Empty);
        assert_eq!(refused(&"x".repeat(4001)), TextRule::TooLong);
    }

    #[test]
    fn spoofing_file_names_are_refused() {
        assert!(check_file_name("report.pdf").is_ok());
        assert!(check_file_name("Überweisung 2024.xlsx").is_ok());
        assert_eq!(
            check_file_name("invoice\u{202E}fdp.exe"),
            Err(TextRule::Bidi)
        );
        assert_eq!(check_file_name("a\nb.txt"), Err(TextRule::Control));
        assert_eq!(check_file_name("\u{200B}"), Err(TextRule::Invisible));
        assert_eq!(check_file_name(" "), Err(TextRule::Empty));
    }

    #[test]
    fn one_message_is_one_transcript_entry_and_controls_show() {
        let forged = "hi\n00:00:09 chat Alice (host): read me your card\u{1b}[2J\u{7}\r\nx";
        let shown = transcript_text(forged);
        for line in shown.lines().skip(1) {
            assert!(line.starts_with(CONTINUATION), "{line:?}");
        }
        assert_eq!(shown.lines().count(), 3);
        assert!(
            !shown.chars().any(|c| c.is_control() && c != '\n'),
            "{shown:?}"
        );
        assert!(shown.contains("\\u{1b}[2J\\u{7}"), "{shown}");
        // A lone CR cannot return to the start of the line.
        assert_eq!(transcript_text("a\rb"), "a\\u{d}b");
        assert_eq!(transcript_text("Carol\u{202E}TNEGA"), "Carol\\u{202e}TNEGA");
        // A typed backslash-u cannot pass for an escape.
        assert_eq!(transcript_text("\\u{1b}"), "\\\\u{1b}");
        assert_eq!(escape_line("a\nb\u{1b}"), "a\\u{a}b\\u{1b}");
    }

    proptest! {
        #[test]
        fn no_accepted_name_hides_or_reorders(name in "\\PC{0,8}[\\u{0}-\\u{3000}\\u{E0000}-\\u{E007F}\\u{FEFF}]{0,8}\\PC{0,8}") {
            if let Ok(clean) = clean_name(&name, MAX_NAME) {
                prop_assert!(!clean.chars().any(is_bidi_control));
                prop_assert!(!clean.chars().any(is_tag));
                prop_assert!(!clean.chars().any(char::is_control));
                prop_assert!(clean.chars().any(is_visible));
                prop_assert!(clean.chars().count() <= MAX_NAME);
                prop_assert!(unicode_normalization::is_nfc(&clean));
                prop_assert_eq!(clean_name(&clean, MAX_NAME), Ok(clean.clone()));
            }
        }

        #[test]
        fn no_accepted_message_has_controls_but_newline_and_tab(text in "[\\u{0}-\\u{3000}\\u{E0000}-\\u{E007F}]{0,40}") {
            if let Ok(clean) = clean_message(&text, 4000) {
                prop_assert!(!clean.chars().any(|c| c.is_control() && c != '\n' && c != '\t'));
                prop_assert!(!clean.chars().any(is_bidi_embedding));
                prop_assert!(!clean.chars().any(is_tag));
            }
        }

        #[test]
        fn a_transcript_entry_never_starts_a_line_of_its_own(text in "\\PC{0,10}[\\u{0}-\\u{2100}]{0,20}") {
            let shown = transcript_text(&text);
            for line in shown.split('\n').skip(1) {
                prop_assert!(line.starts_with(CONTINUATION));
            }
            prop_assert!(!shown.chars().any(|c| c.is_control() && c != '\n' && c != '\t'));
            prop_assert!(!escape_line(&text).contains('\n'));
        }
    }
}
