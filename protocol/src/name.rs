//! Fixed-width name fields (`docs/PROTOCOL.md` §3.1).
//!
//! User names and file names travel in 255-byte fields: the name's bytes, a
//! NUL, then zero padding. A name is therefore at most 254 bytes. On input we
//! accept any bytes after the first NUL (their meaning is unambiguous: the name
//! ends at the NUL) but we always write zeros.

use std::fmt;

/// Width of a name field on the wire.
pub const NAME_FIELD_LEN: usize = 255;
/// The longest name a field can carry: one byte is needed for the NUL.
pub const MAX_NAME_LEN: usize = NAME_FIELD_LEN - 1;

/// Why a name field or a name was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error("name field is {0} bytes, expected {NAME_FIELD_LEN}")]
    FieldWidth(usize),
    #[error("name field has no NUL terminator")]
    Unterminated,
    #[error("name is empty")]
    Empty,
    #[error("name is {len} bytes, the limit is {max}")]
    TooLong { len: usize, max: usize },
    #[error("name contains a NUL or control byte 0x{0:02x}")]
    ControlByte(u8),
}

/// Validates the bytes of a name: non-empty, at most `max` bytes, no NUL and
/// no ASCII control characters. Any other byte (including `/`, `\` and any
/// byte from 0x80 up) is allowed on the wire: legacy clients send paths such as
/// `dir/file.txt`; the server decides how a name maps to storage.
fn validate(bytes: &[u8], max: usize) -> Result<(), NameError> {
    if bytes.is_empty() {
        return Err(NameError::Empty);
    }
    if bytes.len() > max {
        return Err(NameError::TooLong {
            len: bytes.len(),
            max,
        });
    }
    if let Some(&b) = bytes.iter().find(|&&b| b < 0x20 || b == 0x7f) {
        return Err(NameError::ControlByte(b));
    }
    Ok(())
}

/// Extracts the name from a 255-byte field.
fn from_field(field: &[u8], max: usize) -> Result<Vec<u8>, NameError> {
    if field.len() != NAME_FIELD_LEN {
        return Err(NameError::FieldWidth(field.len()));
    }
    let end = field
        .iter()
        .position(|&b| b == 0)
        .ok_or(NameError::Unterminated)?;
    let name = field.get(..end).unwrap_or_default();
    validate(name, max)?;
    Ok(name.to_vec())
}

fn write_field(name: &[u8], out: &mut impl bytes::BufMut) {
    out.put_slice(name);
    out.put_bytes(0, NAME_FIELD_LEN - name.len());
}

macro_rules! name_type {
    ($(#[$doc:meta])* $ty:ident) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $ty(Vec<u8>);

        impl $ty {
            /// Validates a name given as bytes.
            ///
            /// # Errors
            /// When the name is empty, longer than [`MAX_NAME_LEN`], or holds
            /// a NUL or control byte.
            pub fn new(bytes: impl Into<Vec<u8>>) -> Result<Self, NameError> {
                let bytes = bytes.into();
                validate(&bytes, MAX_NAME_LEN)?;
                Ok(Self(bytes))
            }

            /// Parses a 255-byte wire field, also enforcing `max` (at most
            /// [`MAX_NAME_LEN`]).
            ///
            /// # Errors
            /// When the field is not 255 bytes, has no NUL, or the name is
            /// invalid or longer than `max`.
            pub fn from_field(field: &[u8], max: usize) -> Result<Self, NameError> {
                from_field(field, max.min(MAX_NAME_LEN)).map(Self)
            }

            /// Appends the 255-byte zero-padded field to `out`.
            pub fn write_field(&self, out: &mut impl bytes::BufMut) {
                write_field(&self.0, out);
            }

            /// The name's bytes, without terminator or padding.
            pub fn as_bytes(&self) -> &[u8] {
                &self.0
            }

            /// The name as text, with invalid UTF-8 replaced.
            pub fn to_string_lossy(&self) -> String {
                String::from_utf8_lossy(&self.0).into_owned()
            }
        }

        impl fmt::Debug for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{:?}", String::from_utf8_lossy(&self.0))
            }
        }

        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&String::from_utf8_lossy(&self.0))
            }
        }

        impl TryFrom<&str> for $ty {
            type Error = NameError;
            fn try_from(s: &str) -> Result<Self, NameError> {
                Self::new(s.as_bytes())
            }
        }
    };
}

name_type!(
    /// A client's user name as carried in register, reconnect and public-key
    /// requests.
    UserName
);
name_type!(
    /// A file name as a client sent it. It may look like a path
    /// (`dir/a.txt`, `C:\x\a.doc`, even `../../etc/passwd`): it is a label
    /// here, and never used as a path without the server's sanitising.
    FileName
);

#[cfg(test)]
mod tests {
    use super::*;

    fn field(name: &[u8]) -> Vec<u8> {
        let mut f = name.to_vec();
        f.resize(NAME_FIELD_LEN, 0);
        f
    }

    #[test]
    fn accepts_name_of_exactly_254_bytes() {
        let name = vec![b'x'; MAX_NAME_LEN];
        let parsed = FileName::from_field(&field(&name), MAX_NAME_LEN).unwrap();
        assert_eq!(parsed.as_bytes(), &name[..]);
        let mut out = Vec::new();
        parsed.write_field(&mut out);
        assert_eq!(out, field(&name));
    }

    #[test]
    fn rejects_field_of_255_bytes_without_nul() {
        let f = vec![b'x'; NAME_FIELD_LEN];
        assert_eq!(
            FileName::from_field(&f, MAX_NAME_LEN),
            Err(NameError::Unterminated)
        );
    }

    #[test]
    fn rejects_name_one_over_a_configured_limit() {
        assert!(UserName::from_field(&field(&[b'a'; 100]), 100).is_ok());
        assert_eq!(
            UserName::from_field(&field(&[b'a'; 101]), 100),
            Err(NameError::TooLong { len: 101, max: 100 })
        );
    }

    #[test]
    fn rejects_empty_and_control_bytes() {
        assert_eq!(
            FileName::from_field(&field(b""), 254),
            Err(NameError::Empty)
        );
        assert_eq!(
            FileName::from_field(&field(b"a\nb"), 254),
            Err(NameError::ControlByte(b'\n'))
        );
        assert_eq!(
            FileName::new(vec![b'a'; 255]),
            Err(NameError::TooLong { len: 255, max: 254 })
        );
        assert_eq!(
            FileName::from_field(&[0u8; 254], 254),
            Err(NameError::FieldWidth(254))
        );
    }

    #[test]
    fn accepts_garbage_after_the_terminator_and_writes_zeros() {
        let mut f = field(b"a.txt");
        f[100] = 0xAA;
        let parsed = FileName::from_field(&f, 254).unwrap();
        assert_eq!(parsed.as_bytes(), b"a.txt");
        let mut out = Vec::new();
        parsed.write_field(&mut out);
        assert_eq!(out, field(b"a.txt"));
    }

    #[test]
    fn accepts_path_like_names_as_labels() {
        for n in ["dir/file.txt", "C:\\Users\\x\\file.doc", "../../etc/passwd"] {
            assert_eq!(FileName::try_from(n).unwrap().to_string(), n);
        }
    }
}
