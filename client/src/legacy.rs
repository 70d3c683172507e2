//! The legacy `transfer.info` (`docs/PROTOCOL.md` §8): line 1 `HOST:PORT`,
//! line 2 the user name, then the files to back up, one per line.

use std::path::{Path, PathBuf};

use protocol::UserName;

use crate::error::{io_reason, Error};
use crate::settings::parse_server;

/// Name of the legacy settings file.
pub const TRANSFER_INFO: &str = "transfer.info";

/// The contents of a `transfer.info`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TransferInfo {
    /// `HOST:PORT`.
    pub server: String,
    pub name: UserName,
    /// The files to back up, as written (relative paths are relative to the
    /// directory holding `transfer.info`).
    pub files: Vec<PathBuf>,
}

impl TransferInfo {
    /// Parses the text of a `transfer.info`. Blank lines after line 2 are
    /// ignored, as is trailing white space (legacy editors leave CRs).
    ///
    /// # Errors
    /// A description of the first problem found.
    pub fn parse(text: &str) -> Result<Self, String> {
        let text = text.strip_prefix('\u{feff}').unwrap_or(text);
        let mut lines = text.lines().map(str::trim_end);
        let server_line = lines.next().map(str::trim).unwrap_or_default();
        if server_line.is_empty() {
            return Err("line 1 (the server address) is empty".into());
        }
        let server = parse_server(server_line)
            .map_err(|_| format!("line 1 \"{server_line}\" is not HOST:PORT"))?;
        let name_line = lines.next().map(str::trim).unwrap_or_default();
        let name = UserName::new(name_line.as_bytes())
            .map_err(|e| format!("line 2 is not a user name: {e}"))?;
        let files: Vec<PathBuf> = lines
            .filter(|l| !l.trim().is_empty())
            .map(PathBuf::from)
            .collect();
        if files.is_empty() {
            return Err("it names no file to back up from line 3 on".into());
        }
        Ok(Self {
            server,
            name,
            files,
        })
    }

    /// Reads `transfer.info` from `dir`, or `None` if there is none.
    ///
    /// # Errors
    /// When it exists but cannot be read or parsed.
    pub fn load(dir: &Path) -> Result<Option<Self>, Error> {
        let path = dir.join(TRANSFER_INFO);
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => {
                return Err(Error::TransferInfo {
                    path,
                    detail: io_reason(&e),
                })
            }
        };
        let mut info = Self::parse(&text).map_err(|detail| Error::TransferInfo { path, detail })?;
        for f in &mut info.files {
            if f.is_relative() {
                *f = dir.join(&*f);
            }
        }
        Ok(Some(info))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_spec_example_with_several_files() {
        let t = TransferInfo::parse(
            "127.0.0.1:1234\r\nMichael Jackson\r\nNew_product_spec.docx\r\n\r\nb/c.txt  \n",
        )
        .unwrap();
        assert_eq!(t.server, "127.0.0.1:1234");
        assert_eq!(t.name.to_string(), "Michael Jackson");
        assert_eq!(
            t.files,
            vec![
                PathBuf::from("New_product_spec.docx"),
                PathBuf::from("b/c.txt")
            ]
        );
    }

    #[test]
    fn rejects_missing_lines_and_bad_addresses() {
        assert!(TransferInfo::parse("").unwrap_err().contains("line 1"));
        assert!(TransferInfo::parse("host:x\nbob\nf\n")
            .unwrap_err()
            .contains("line 1"));
        assert!(TransferInfo::parse("host:1\n\nf\n")
            .unwrap_err()
            .contains("line 2"));
        assert!(TransferInfo::parse("host:1\nbob\n\n")
            .unwrap_err()
            .contains("line 3"));
    }

    #[test]
    fn resolves_relative_files_against_its_directory() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(TransferInfo::load(dir.path()).unwrap(), None);
        std::fs::write(dir.path().join(TRANSFER_INFO), "h:1\nbob\na.txt\n/abs/b\n").unwrap();
        let t = TransferInfo::load(dir.path()).unwrap().unwrap();
        assert_eq!(
            t.files,
            vec![dir.path().join("a.txt"), PathBuf::from("/abs/b")]
        );
        std::fs::write(dir.path().join(TRANSFER_INFO), "h:1\n").unwrap();
        let err = TransferInfo::load(dir.path()).unwrap_err();
        assert!(err.to_string().contains("transfer.info"), "{err}");
    }
}
