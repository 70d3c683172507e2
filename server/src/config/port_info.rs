//! The legacy `port.info` file (`docs/PROTOCOL.md` §7): one line holding the
//! port. Missing or bad, it must never stop the server.

use std::path::Path;

/// What a `port.info` file said.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PortInfo {
    /// A valid port.
    Port(u16),
    /// No file there.
    Missing,
    /// The file exists but could not be read or does not hold a port.
    Invalid(String),
}

/// Parses the contents of `port.info`: optional whitespace, a port in
/// 1..=65535, optional whitespace. A UTF-8 byte order mark is ignored.
///
/// # Errors
/// A description of what is wrong, for the warning.
pub fn parse_port_info(text: &str) -> Result<u16, String> {
    let trimmed = text.trim_start_matches('\u{feff}').trim();
    if trimmed.is_empty() {
        return Err("the file is empty".into());
    }
    match trimmed.parse::<u16>() {
        Ok(0) => Err("port 0 is not a listening port".into()),
        Ok(port) => Ok(port),
        Err(_) => Err(format!(
            "{:?} is not a port number (1-65535)",
            truncate(trimmed)
        )),
    }
}

fn truncate(s: &str) -> &str {
    match s.char_indices().nth(32) {
        Some((i, _)) => s.get(..i).unwrap_or(s),
        None => s,
    }
}

/// Reads `path` as a `port.info` file.
pub fn read_port_info(path: &Path) -> PortInfo {
    match std::fs::read(path) {
        Ok(bytes) => match std::str::from_utf8(&bytes) {
            Ok(text) => match parse_port_info(text) {
                Ok(port) => PortInfo::Port(port),
                Err(reason) => PortInfo::Invalid(reason),
            },
            Err(_) => PortInfo::Invalid("the file is not text".into()),
        },
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => PortInfo::Missing,
        Err(e) => PortInfo::Invalid(e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_a_port_with_surrounding_whitespace() {
        assert_eq!(parse_port_info("1256"), Ok(1256));
        assert_eq!(parse_port_info("  8080\r\n"), Ok(8080));
        assert_eq!(parse_port_info("\u{feff}1357\n"), Ok(1357));
        assert_eq!(parse_port_info("65535"), Ok(65535));
        assert_eq!(parse_port_info("1"), Ok(1));
    }

    #[test]
    fn rejects_empty_zero_out_of_range_and_junk() {
        for bad in [
            "",
            "\n",
            "0",
            "65536",
            "-1",
            "port=1256",
            "1256 1257",
            "12.5",
        ] {
            assert!(parse_port_info(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn reads_missing_bad_and_good_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("port.info");
        assert_eq!(read_port_info(&path), PortInfo::Missing);
        std::fs::write(&path, [0xff, 0xfe, 0x31]).unwrap();
        assert!(matches!(read_port_info(&path), PortInfo::Invalid(_)));
        std::fs::write(&path, "junk").unwrap();
        assert!(matches!(read_port_info(&path), PortInfo::Invalid(_)));
        std::fs::write(&path, "2222\n").unwrap();
        assert_eq!(read_port_info(&path), PortInfo::Port(2222));
    }
}
