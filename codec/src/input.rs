//! Remote-control input events: the binary messages agents send to the customer over
//! the WebRTC data channel labelled `input` (reliable, ordered).
//!
//! One event per data-channel message, little-endian:
//!
//! | bytes | field |
//! |---|---|
//! | 0 | format version, [`VERSION`] (1) |
//! | 1 | kind tag (see [`InputKind`]) |
//! | 2..6 | `seq: u32`, a sequence number ([`SEQ_RANGE`]) |
//! | 6.. | the kind's fields, fixed size except [`InputKind::Clipboard`] |
//!
//! The encoding is canonical: [`decode`] accepts exactly the bytes [`encode`] produces
//! (booleans are 0 or 1, no unknown modifier bits, no trailing bytes), so a message that
//! decodes re-encodes to the same bytes. [`validate`] runs the same checks without
//! allocating, for the relay, which only needs to know that a message is well formed.
//!
//! **No sender identity.** A message says nothing about who sent it. The relay forwards
//! the bytes from every agent allowed to control (masked agents included) unchanged
//! except `seq`: agents number their own events, and the relay restamps bytes 2..6 with
//! its own counter per customer channel, because several agents' interleaved counters
//! would tell the customer that several (possibly masked) agents are sending. The
//! customer sees one gap-free sequence.

/// The format version this module writes and the only one it reads.
pub const VERSION: u8 = 1;
/// Largest clipboard text, in UTF-8 bytes.
pub const MAX_CLIPBOARD_BYTES: usize = 16 * 1024;
/// Where `seq` sits in an encoded event (little-endian `u32`).
pub const SEQ_RANGE: std::ops::Range<usize> = 2..6;
/// Bytes before the kind's fields: version, kind tag, `seq`.
pub const HEADER_BYTES: usize = 6;
/// Largest valid message: a clipboard event with [`MAX_CLIPBOARD_BYTES`] of text.
pub const MAX_EVENT_BYTES: usize = HEADER_BYTES + 2 + MAX_CLIPBOARD_BYTES;

const TAG_MOUSE_MOVE: u8 = 1;
const TAG_MOUSE_BUTTON: u8 = 2;
const TAG_WHEEL: u8 = 3;
const TAG_KEY: u8 = 4;
const TAG_CTRL_ALT_DEL: u8 = 5;
const TAG_CLIPBOARD: u8 = 6;

/// One input event with the sender's sequence number.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InputEvent {
    /// The sender's sequence number, increasing by one per event, for ordering checks.
    pub seq: u32,
    /// What happened.
    pub kind: InputKind,
}

/// What an input event does. The tag byte of each kind is given in brackets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InputKind {
    /// \[1\] Pointer moved to an absolute position, `x: u16, y: u16`.
    MouseMove {
        /// 0 = left edge, 65535 = right edge of the customer's screen.
        x: u16,
        /// 0 = top edge, 65535 = bottom edge of the customer's screen.
        y: u16,
    },
    /// \[2\] Mouse button pressed or released, `button: u8, down: u8`.
    MouseButton {
        /// Which button.
        button: MouseButton,
        /// Pressed (`true`) or released.
        down: bool,
    },
    /// \[3\] Wheel scrolled, `dx: i16, dy: i16`, in pixels; positive is right and down,
    /// as in the DOM's `WheelEvent`.
    Wheel {
        /// Horizontal scroll.
        dx: i16,
        /// Vertical scroll.
        dy: i16,
    },
    /// \[4\] Key pressed or released, `code: u32, down: u8, modifiers: u8`.
    Key {
        /// The physical key as a USB HID usage, `(page << 16) | id`, as Chromium maps DOM
        /// `KeyboardEvent.code` (e.g. `KeyA` = `0x0007_0004`). Not checked here.
        code: u32,
        /// Pressed (`true`) or released.
        down: bool,
        /// Modifiers held at the time.
        modifiers: Modifiers,
    },
    /// \[5\] The secure attention sequence, which a browser cannot send as keys. No fields.
    CtrlAltDel,
    /// \[6\] Set the customer's clipboard, `len: u16` then `len` bytes of UTF-8.
    Clipboard {
        /// At most [`MAX_CLIPBOARD_BYTES`] in UTF-8.
        text: String,
    },
}

/// A mouse button, numbered as the DOM's `MouseEvent.button`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MouseButton {
    /// 0: the main button.
    Left = 0,
    /// 1: the wheel button.
    Middle = 1,
    /// 2: the secondary button.
    Right = 2,
    /// 3: browser back.
    Back = 3,
    /// 4: browser forward.
    Forward = 4,
}

impl MouseButton {
    /// Every button, in wire order.
    pub const ALL: [MouseButton; 5] = [
        MouseButton::Left,
        MouseButton::Middle,
        MouseButton::Right,
        MouseButton::Back,
        MouseButton::Forward,
    ];

    /// The button with this wire value, if any.
    pub fn from_u8(value: u8) -> Option<Self> {
        Self::ALL.get(usize::from(value)).copied()
    }
}

/// Modifier keys held during a key event: a set of bits in one byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Modifiers(u8);

impl Modifiers {
    /// No modifiers.
    pub const NONE: Self = Self(0);
    /// Either Shift key.
    pub const SHIFT: Self = Self(1 << 0);
    /// Either Control key.
    pub const CTRL: Self = Self(1 << 1);
    /// Either Alt (Option) key.
    pub const ALT: Self = Self(1 << 2);
    /// Either Meta (Windows, Command) key.
    pub const META: Self = Self(1 << 3);
    /// Caps Lock is on.
    pub const CAPS_LOCK: Self = Self(1 << 4);
    /// Every defined bit.
    pub const ALL: Self = Self(0b1_1111);

    /// The wire byte.
    pub fn bits(self) -> u8 {
        self.0
    }

    /// The set with these bits, or `None` if an undefined bit is set.
    pub fn from_bits(bits: u8) -> Option<Self> {
        (bits & !Self::ALL.0 == 0).then_some(Self(bits))
    }

    /// Whether every modifier of `other` is in `self`.
    pub fn contains(self, other: Self) -> bool {
        self.0 & other.0 == other.0
    }
}

impl std::ops::BitOr for Modifiers {
    type Output = Self;

    fn bitor(self, rhs: Self) -> Self {
        Self(self.0 | rhs.0)
    }
}

/// Why bytes are not a valid input event.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InputError {
    /// The message ends before its fields do.
    #[error("truncated input event: {len} bytes, at least {needed} needed")]
    Truncated {
        /// Bytes received.
        len: usize,
        /// Bytes the header and fields read so far require.
        needed: usize,
    },
    /// A format version this build does not read.
    #[error("unknown input format version {0}")]
    UnknownVersion(u8),
    /// A kind tag this version does not define.
    #[error("unknown input event kind {0}")]
    UnknownKind(u8),
    /// Bytes after the last field.
    #[error("{0} trailing bytes after the input event")]
    TrailingBytes(usize),
    /// A boolean byte other than 0 or 1.
    #[error("invalid boolean byte {0}")]
    InvalidBool(u8),
    /// A mouse button byte above 4.
    #[error("invalid mouse button {0}")]
    InvalidButton(u8),
    /// A modifier byte with undefined bits set.
    #[error("invalid modifier bits {0:#04x}")]
    InvalidModifiers(u8),
    /// Clipboard text that is not UTF-8.
    #[error("clipboard text is not valid UTF-8")]
    InvalidUtf8,
    /// Clipboard text longer than [`MAX_CLIPBOARD_BYTES`] (on decode, as declared by its
    /// length prefix).
    #[error("clipboard text of {0} bytes exceeds the limit of {MAX_CLIPBOARD_BYTES} bytes")]
    ClipboardTooLarge(usize),
}

/// Appends the encoding of `event` to `out`.
///
/// Fails only for clipboard text over [`MAX_CLIPBOARD_BYTES`]; `out` is then unchanged.
pub fn encode(event: &InputEvent, out: &mut Vec<u8>) -> Result<(), InputError> {
    if let InputKind::Clipboard { text } = &event.kind {
        if text.len() > MAX_CLIPBOARD_BYTES {
            return Err(InputError::ClipboardTooLarge(text.len()));
        }
    }
    let tag = match &event.kind {
        InputKind::MouseMove { .. } => TAG_MOUSE_MOVE,
        InputKind::MouseButton { .. } => TAG_MOUSE_BUTTON,
        InputKind::Wheel { .. } => TAG_WHEEL,
        InputKind::Key { .. } => TAG_KEY,
        InputKind::CtrlAltDel => TAG_CTRL_ALT_DEL,
        InputKind::Clipboard { .. } => TAG_CLIPBOARD,
    };
    out.push(VERSION);
    out.push(tag);
    out.extend_from_slice(&event.seq.to_le_bytes());
    match &event.kind {
        InputKind::MouseMove { x, y } => {
            out.extend_from_slice(&x.to_le_bytes());
            out.extend_from_slice(&y.to_le_bytes());
        }
        InputKind::MouseButton { button, down } => {
            out.extend_from_slice(&[*button as u8, u8::from(*down)]);
        }
        InputKind::Wheel { dx, dy } => {
            out.extend_from_slice(&dx.to_le_bytes());
            out.extend_from_slice(&dy.to_le_bytes());
        }
        InputKind::Key {
            code,
            down,
            modifiers,
        } => {
            out.extend_from_slice(&code.to_le_bytes());
            out.extend_from_slice(&[u8::from(*down), modifiers.bits()]);
        }
        InputKind::CtrlAltDel => {}
        InputKind::Clipboard { text } => {
            // Checked above: the length fits in a u16.
            out.extend_from_slice(&(text.len() as u16).to_le_bytes());
            out.extend_from_slice(text.as_bytes());
        }
    }
    Ok(())
}

/// The encoding of `event` in a new buffer; see [`encode`].
pub fn encode_to_vec(event: &InputEvent) -> Result<Vec<u8>, InputError> {
    let mut out = Vec::new();
    encode(event, &mut out)?;
    Ok(out)
}

/// Parses one data-channel message.
pub fn decode(bytes: &[u8]) -> Result<InputEvent, InputError> {
    let (seq, kind) = parse(bytes)?;
    let kind = match kind {
        Parsed::Fixed(kind) => kind,
        Parsed::Clipboard(text) => InputKind::Clipboard {
            text: text.to_owned(),
        },
    };
    Ok(InputEvent { seq, kind })
}

/// Checks one data-channel message as [`decode`] does, without allocating.
pub fn validate(bytes: &[u8]) -> Result<(), InputError> {
    parse(bytes).map(drop)
}

/// A parsed kind that borrows clipboard text from the message.
enum Parsed<'a> {
    Fixed(InputKind),
    Clipboard(&'a str),
}

fn parse(bytes: &[u8]) -> Result<(u32, Parsed<'_>), InputError> {
    let mut r = Reader { bytes, pos: 0 };
    let version = r.u8()?;
    if version != VERSION {
        return Err(InputError::UnknownVersion(version));
    }
    let tag = r.u8()?;
    if !(TAG_MOUSE_MOVE..=TAG_CLIPBOARD).contains(&tag) {
        return Err(InputError::UnknownKind(tag));
    }
    let seq = u32::from_le_bytes(r.array()?);
    let kind = match tag {
        TAG_MOUSE_MOVE => Parsed::Fixed(InputKind::MouseMove {
            x: u16::from_le_bytes(r.array()?),
            y: u16::from_le_bytes(r.array()?),
        }),
        TAG_MOUSE_BUTTON => {
            let [button, down] = r.array()?;
            Parsed::Fixed(InputKind::MouseButton {
                button: MouseButton::from_u8(button).ok_or(InputError::InvalidButton(button))?,
                down: bool_from(down)?,
            })
        }
        TAG_WHEEL => Parsed::Fixed(InputKind::Wheel {
            dx: i16::from_le_bytes(r.array()?),
            dy: i16::from_le_bytes(r.array()?),
        }),
        TAG_KEY => {
            let code = u32::from_le_bytes(r.array()?);
            let [down, modifiers] = r.array()?;
            Parsed::Fixed(InputKind::Key {
                code,
                down: bool_from(down)?,
                modifiers: Modifiers::from_bits(modifiers)
                    .ok_or(InputError::InvalidModifiers(modifiers))?,
            })
        }
        TAG_CTRL_ALT_DEL => Parsed::Fixed(InputKind::CtrlAltDel),
        _ => {
            let len = usize::from(u16::from_le_bytes(r.array()?));
            if len > MAX_CLIPBOARD_BYTES {
                return Err(InputError::ClipboardTooLarge(len));
            }
            let text = std::str::from_utf8(r.take(len)?).map_err(|_| InputError::InvalidUtf8)?;
            Parsed::Clipboard(text)
        }
    };
    match bytes.len() - r.pos {
        0 => Ok((seq, kind)),
        extra => Err(InputError::TrailingBytes(extra)),
    }
}

fn bool_from(byte: u8) -> Result<bool, InputError> {
    match byte {
        0 => Ok(false),
        1 => Ok(true),
        other => Err(InputError::InvalidBool(other)),
    }
}

/// A cursor over a message that reports how much was needed when it runs out.
struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], InputError> {
        let needed = self.pos + n;
        let taken = self
            .bytes
            .get(self.pos..needed)
            .ok_or(InputError::Truncated {
                len: self.bytes.len(),
                needed,
            })?;
        self.pos = needed;
        Ok(taken)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], InputError> {
        let mut array = [0; N];
        array.copy_from_slice(self.take(N)?);
        Ok(array)
    }

    fn u8(&mut self) -> Result<u8, InputError> {
        let [byte] = self.array()?;
        Ok(byte)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn event(seq: u32, kind: InputKind) -> InputEvent {
        InputEvent { seq, kind }
    }

    fn bytes_of(event: &InputEvent) -> Vec<u8> {
        encode_to_vec(event).unwrap()
    }

    /// One example per kind with its exact encoding. If this fails, the wire format
    /// changed: bump [`VERSION`] instead of editing the expected bytes.
    #[test]
    fn golden_layout() {
        let seq = 0x0403_0201;
        let cases: [(InputKind, &[u8]); 6] = [
            (
                InputKind::MouseMove {
                    x: 0x1234,
                    y: 0xfffe,
                },
                &[1, 1, 1, 2, 3, 4, 0x34, 0x12, 0xfe, 0xff],
            ),
            (
                InputKind::MouseButton {
                    button: MouseButton::Right,
                    down: true,
                },
                &[1, 2, 1, 2, 3, 4, 2, 1],
            ),
            (
                InputKind::Wheel { dx: -2, dy: 120 },
                &[1, 3, 1, 2, 3, 4, 0xfe, 0xff, 120, 0],
            ),
            (
                InputKind::Key {
                    code: 0x0007_0004,
                    down: false,
                    modifiers: Modifiers::SHIFT | Modifiers::META,
                },
                &[1, 4, 1, 2, 3, 4, 0x04, 0x00, 0x07, 0x00, 0, 0b1001],
            ),
            (InputKind::CtrlAltDel, &[1, 5, 1, 2, 3, 4]),
            (
                InputKind::Clipboard { text: "hé".into() },
                &[1, 6, 1, 2, 3, 4, 3, 0, b'h', 0xc3, 0xa9],
            ),
        ];
        for (kind, expected) in cases {
            let event = event(seq, kind);
            assert_eq!(bytes_of(&event), expected, "{event:?}");
            assert_eq!(decode(expected).unwrap(), event);
        }
    }

    #[test]
    fn modifier_and_button_wire_values() {
        assert_eq!(
            [
                Modifiers::SHIFT,
                Modifiers::CTRL,
                Modifiers::ALT,
                Modifiers::META,
                Modifiers::CAPS_LOCK
            ]
            .map(Modifiers::bits),
            [1, 2, 4, 8, 16]
        );
        assert_eq!(MouseButton::ALL.map(|b| b as u8), [0, 1, 2, 3, 4]);
        assert!((Modifiers::CTRL | Modifiers::ALT).contains(Modifiers::ALT));
        assert!(!Modifiers::CTRL.contains(Modifiers::ALT));
    }

    #[test]
    fn tells_errors_apart() {
        let key = [1, 4, 0, 0, 0, 0, 4, 0, 7, 0, 1, 0];
        assert!(decode(&key).is_ok());
        let with = |i: usize, v: u8| {
            let mut b = key.to_vec();
            b[i] = v;
            decode(&b).unwrap_err()
        };
        assert_eq!(with(0, 2), InputError::UnknownVersion(2));
        assert_eq!(with(1, 0), InputError::UnknownKind(0));
        assert_eq!(with(1, 7), InputError::UnknownKind(7));
        assert_eq!(with(10, 2), InputError::InvalidBool(2));
        assert_eq!(with(11, 0x20), InputError::InvalidModifiers(0x20));
        assert_eq!(
            decode(&[1, 2, 0, 0, 0, 0, 5, 0]).unwrap_err(),
            InputError::InvalidButton(5)
        );
        assert_eq!(
            decode(&[1, 5, 0, 0, 0, 0, 9, 9]).unwrap_err(),
            InputError::TrailingBytes(2)
        );
        assert_eq!(
            decode(&key[..7]).unwrap_err(),
            InputError::Truncated { len: 7, needed: 10 }
        );
        assert_eq!(
            decode(&[]).unwrap_err(),
            InputError::Truncated { len: 0, needed: 1 }
        );
        assert_eq!(
            decode(&[1, 6, 0, 0, 0, 0, 2, 0, 0xc3, 0x28]).unwrap_err(),
            InputError::InvalidUtf8
        );
    }

    #[test]
    fn clipboard_limit() {
        let at_limit = event(
            7,
            InputKind::Clipboard {
                text: "é".repeat(MAX_CLIPBOARD_BYTES / 2),
            },
        );
        let bytes = bytes_of(&at_limit);
        assert_eq!(bytes.len(), MAX_EVENT_BYTES);
        assert_eq!(decode(&bytes).unwrap(), at_limit);

        let over = event(
            7,
            InputKind::Clipboard {
                text: "x".repeat(MAX_CLIPBOARD_BYTES + 1),
            },
        );
        let mut out = vec![0xaa];
        assert_eq!(
            encode(&over, &mut out).unwrap_err(),
            InputError::ClipboardTooLarge(MAX_CLIPBOARD_BYTES + 1)
        );
        assert_eq!(out, [0xaa], "a failed encode leaves the buffer alone");

        // A declared length over the limit is refused before the text is looked for.
        let declared = u16::try_from(MAX_CLIPBOARD_BYTES + 1)
            .unwrap()
            .to_le_bytes();
        assert_eq!(
            decode(&[1, 6, 0, 0, 0, 0, declared[0], declared[1]]).unwrap_err(),
            InputError::ClipboardTooLarge(MAX_CLIPBOARD_BYTES + 1)
        );
    }

    fn any_kind() -> impl Strategy<Value = InputKind> {
        prop_oneof![
            (any::<u16>(), any::<u16>()).prop_map(|(x, y)| InputKind::MouseMove { x, y }),
            (0..5u8, any::<bool>()).prop_map(|(b, down)| InputKind::MouseButton {
                button: MouseButton::ALL[usize::from(b)],
                down
            }),
            (any::<i16>(), any::<i16>()).prop_map(|(dx, dy)| InputKind::Wheel { dx, dy }),
            (any::<u32>(), any::<bool>(), 0..32u8).prop_map(|(code, down, m)| InputKind::Key {
                code,
                down,
                modifiers: Modifiers::from_bits(m).unwrap(),
            }),
            Just(InputKind::CtrlAltDel),
            ".{0,300}".prop_map(|text| InputKind::Clipboard { text }),
        ]
    }

    fn any_event() -> impl Strategy<Value = InputEvent> {
        (any::<u32>(), any_kind()).prop_map(|(seq, kind)| InputEvent { seq, kind })
    }

    proptest! {
        #[test]
        fn round_trips(event in any_event()) {
            let bytes = bytes_of(&event);
            prop_assert!(bytes.len() <= MAX_EVENT_BYTES);
            prop_assert_eq!(validate(&bytes), Ok(()));
            prop_assert_eq!(decode(&bytes), Ok(event));
        }

        #[test]
        fn every_truncation_is_reported(event in any_event()) {
            let bytes = bytes_of(&event);
            for len in 0..bytes.len() {
                let err = decode(&bytes[..len]).unwrap_err();
                prop_assert!(matches!(err, InputError::Truncated { .. }), "{len}: {err:?}");
                prop_assert_eq!(validate(&bytes[..len]), Err(err));
            }
        }

        #[test]
        fn extra_bytes_are_refused(event in any_event(), extra in proptest::collection::vec(any::<u8>(), 1..8)) {
            let mut bytes = bytes_of(&event);
            bytes.extend_from_slice(&extra);
            prop_assert_eq!(decode(&bytes), Err(InputError::TrailingBytes(extra.len())));
        }

        /// Whatever decodes is canonical: it re-encodes to exactly the same bytes.
        #[test]
        fn random_bytes_never_panic(
            head in prop_oneof![Just(vec![]), (0..8u8).prop_map(|kind| vec![VERSION, kind])],
            tail in proptest::collection::vec(any::<u8>(), 0..64),
        ) {
            // Half the inputs get past the version and kind checks, to reach the fields.
            let bytes = [head, tail].concat();
            let decoded = decode(&bytes);
            prop_assert_eq!(validate(&bytes), decoded.as_ref().map(drop).map_err(Clone::clone));
            if let Ok(event) = decoded {
                prop_assert_eq!(bytes_of(&event), bytes);
            }
        }

        #[test]
        fn bit_flips_never_panic(event in any_event(), bit in any::<prop::sample::Index>()) {
            let mut bytes = bytes_of(&event);
            let bit = bit.index(bytes.len() * 8);
            bytes[bit / 8] ^= 1 << (bit % 8);
            if let Ok(event) = decode(&bytes) {
                prop_assert_eq!(bytes_of(&event), bytes);
            }
        }
    }
}
