//! PFENet-format list files: `JPEGImages/x.jpg SegmentationClassAug/x.png` per line, paths
//! relative to `data_root`.

use std::path::{Path, PathBuf};

use super::DataError;

/// One line of a list: an image and its label, as written (relative to `data_root`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListEntry {
    pub image: String,
    pub label: String,
}

impl ListEntry {
    pub fn image_path(&self, data_root: &Path) -> PathBuf {
        data_root.join(&self.image)
    }

    pub fn label_path(&self, data_root: &Path) -> PathBuf {
        data_root.join(&self.label)
    }
}

/// Parses list text; `path` names the file in errors. Blank lines are skipped.
pub fn parse_list(text: &str, path: &Path) -> Result<Vec<ListEntry>, DataError> {
    let mut entries = Vec::new();
    for (number, line) in text.lines().enumerate() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        match fields.as_slice() {
            [] => {}
            [image, label] => entries.push(ListEntry {
                image: image.to_string(),
                label: label.to_string(),
            }),
            _ => {
                return Err(DataError::ListLine {
                    path: path.to_path_buf(),
                    line: number + 1,
                    message: format!(
                    "expected `IMAGE LABEL` (two paths relative to data_root), found {} field(s)",
                    fields.len()
                ),
                })
            }
        }
    }
    Ok(entries)
}

/// Reads a list file; `key` is the config key that named it (`train_list`, `val_list`).
pub fn read_list(path: &Path, key: &'static str) -> Result<Vec<ListEntry>, DataError> {
    let text = std::fs::read_to_string(path).map_err(|source| DataError::ListRead {
        path: path.to_path_buf(),
        key,
        source,
    })?;
    parse_list(&text, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_pairs_and_names_bad_lines() {
        let text = "JPEGImages/a.jpg SegmentationClassAug/a.png\n\n  JPEGImages/b.jpg\tSegmentationClassAug/b.png  \n";
        let entries = parse_list(text, Path::new("l.txt")).unwrap();
        assert_eq!(entries.len(), 2);
        assert_eq!(entries[1].image, "JPEGImages/b.jpg");
        assert_eq!(
            entries[0].label_path(Path::new("/d")),
            PathBuf::from("/d/SegmentationClassAug/a.png")
        );
        let message = parse_list("a b\nc\n", Path::new("l.txt"))
            .unwrap_err()
            .to_string();
        assert!(message.contains("l.txt, line 2"), "{message}");
    }
}
