//! List files, paths relative to `data_root` (or absolute), in the formats the references use:
//!
//! - PFENet's lists and BAM's `data_list_{fold}.txt`: `JPEGImages/x.jpg SegmentationClassAug/x.png`
//!   per line.
//! - BAM's `sub_class_file_list_{fold}.txt`: one line, a Python dict literal mapping each class to
//!   the images where it covers at least 2048 pixels, `{1: [('IMG', 'LABEL'), ...], 2: [...]}`.
//!   It is read by a small parser of exactly that grammar (tuples or lists, quoted strings), never
//!   evaluated; its class claims are checked against the labels once they are indexed.
//!
//! The format of a file is told by its content: a dict starts with `{`.

use std::collections::{BTreeMap, HashMap};
use std::path::{Component, Path, PathBuf};

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

/// A `sub_class_file_list` statement: `class` covers at least 2048 pixels of entry `entry`'s
/// label. `line` is where the pair starts in the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClassClaim {
    pub class: usize,
    pub entry: usize,
    pub line: usize,
}

/// A line of the line format without exactly two fields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MalformedLine {
    pub line: usize,
    pub fields: usize,
}

impl MalformedLine {
    /// The error naming this line of list `path`.
    pub fn error(&self, path: &Path) -> DataError {
        DataError::ListLine {
            path: path.to_path_buf(),
            line: self.line,
            message: format!(
                "expected `IMAGE LABEL` (two paths relative to data_root), found {} field(s)",
                self.fields
            ),
        }
    }
}

/// A parsed list file: its distinct entries in order of first appearance, for a
/// `sub_class_file_list` its classes (the dict's keys, with their lines) and per-class claims
/// (both empty for the line format), and for the line format its malformed lines, kept so that
/// `svf-data check` can name every one and still check the rest.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ListFile {
    pub entries: Vec<ListEntry>,
    pub classes: Vec<(usize, usize)>,
    pub claims: Vec<ClassClaim>,
    pub malformed: Vec<MalformedLine>,
}

impl ListFile {
    /// The file itself, or the error of its first malformed line (`path` names the file).
    fn refuse_malformed(self, path: &Path) -> Result<ListFile, DataError> {
        match self.malformed.first() {
            Some(line) => Err(line.error(path)),
            None => Ok(self),
        }
    }
}

/// Parses list text in either format, refusing a malformed line; `path` names the file in errors.
/// Blank lines are skipped.
pub fn parse_list(text: &str, path: &Path) -> Result<Vec<ListEntry>, DataError> {
    parse_list_file(text, path)
        .and_then(|file| file.refuse_malformed(path))
        .map(|file| file.entries)
}

/// Parses list text in either format, keeping a `sub_class_file_list`'s class claims and the line
/// format's malformed lines. A dict's syntax error fails the whole file.
pub fn parse_list_file(text: &str, path: &Path) -> Result<ListFile, DataError> {
    if text.trim_start().starts_with('{') {
        return SubClassParser::new(text, path).parse();
    }
    Ok(parse_lines(text))
}

fn parse_lines(text: &str) -> ListFile {
    let mut file = ListFile::default();
    for (number, line) in text.lines().enumerate() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        match fields.as_slice() {
            [] => {}
            [image, label] => file.entries.push(ListEntry {
                image: image.to_string(),
                label: label.to_string(),
            }),
            _ => file.malformed.push(MalformedLine {
                line: number + 1,
                fields: fields.len(),
            }),
        }
    }
    file
}

/// Reads a list file whose relative entries lie under `data_root`, refusing a malformed line;
/// `key` is the config key that named it (`train_list`, `val_list`).
pub fn read_list(
    path: &Path,
    key: &'static str,
    data_root: &Path,
) -> Result<Vec<ListEntry>, DataError> {
    read_list_file(path, key, data_root).map(|file| file.entries)
}

/// [`read_list`] keeping a `sub_class_file_list`'s class claims.
pub fn read_list_file(
    path: &Path,
    key: &'static str,
    data_root: &Path,
) -> Result<ListFile, DataError> {
    read_list_lenient(path, key, data_root)?.refuse_malformed(path)
}

/// [`read_list_file`] keeping malformed lines in [`ListFile::malformed`] instead of failing. A
/// `data_root` that is no folder, or absolute paths of which none exists (a list written on
/// another machine), fail here, once, rather than as one unreadable file per entry.
pub fn read_list_lenient(
    path: &Path,
    key: &'static str,
    data_root: &Path,
) -> Result<ListFile, DataError> {
    let text = std::fs::read_to_string(path).map_err(|source| DataError::ListRead {
        path: path.to_path_buf(),
        key,
        source,
    })?;
    let file = parse_list_file(&text, path)?;
    let names = || file.entries.iter().flat_map(|e| [&e.image, &e.label]);
    let absolute: Vec<&Path> = names()
        .map(Path::new)
        .filter(|name| name.is_absolute())
        .collect();
    if !absolute.is_empty() && !absolute.iter().any(|name| name.exists()) {
        return Err(DataError::ForeignPaths {
            list: path.to_path_buf(),
            example: absolute[0].to_path_buf(),
            prefix: common_folder(&absolute),
        });
    }
    if !data_root.is_dir() && names().any(|name| Path::new(name).is_relative()) {
        return Err(DataError::DataRoot {
            data_root: data_root.to_path_buf(),
            list: path.to_path_buf(),
        });
    }
    Ok(file)
}

/// The deepest folder holding every one of `paths` (absolute), or `None` when only the root does.
fn common_folder(paths: &[&Path]) -> Option<PathBuf> {
    let mut common: Vec<Component> = paths[0].parent()?.components().collect();
    for path in &paths[1..] {
        let shared = common
            .iter()
            .zip(path.components())
            .take_while(|(a, b)| *a == b)
            .count();
        common.truncate(shared.min(path.components().count() - 1));
    }
    (common.len() > 1).then(|| common.iter().collect())
}

/// BAM's `data_list_{fold}.txt`: `IMG LABEL` per line.
pub fn format_data_list(entries: &[ListEntry]) -> String {
    entries
        .iter()
        .map(|e| format!("{} {}\n", e.image, e.label))
        .collect()
}

/// BAM's `sub_class_file_list_{fold}.txt`: what Python's `str()` prints for its dict of class →
/// list of (image, label) tuples, on one line.
pub fn format_sub_class_list(classes: &BTreeMap<usize, Vec<ListEntry>>) -> String {
    let body: Vec<String> = classes
        .iter()
        .map(|(class, entries)| {
            let pairs: Vec<String> = entries
                .iter()
                .map(|e| format!("({}, {})", python_str(&e.image), python_str(&e.label)))
                .collect();
            format!("{class}: [{}]", pairs.join(", "))
        })
        .collect();
    format!("{{{}}}", body.join(", "))
}

/// A Python string literal of `s` as `repr` writes it (single quotes unless `s` holds one and no
/// double quote).
fn python_str(s: &str) -> String {
    let quote = if s.contains('\'') && !s.contains('"') {
        '"'
    } else {
        '\''
    };
    let mut out = String::with_capacity(s.len() + 2);
    out.push(quote);
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            c if c == quote => {
                out.push('\\');
                out.push(c);
            }
            c => out.push(c),
        }
    }
    out.push(quote);
    out
}

/// A recursive-descent parser of `{INT: [(STR, STR), ...], ...}`: Python's dict, list and tuple
/// syntax restricted to what BAM writes (whitespace and trailing commas allowed, `[a, b]` for a
/// pair accepted too). Nothing is evaluated.
struct SubClassParser<'a> {
    text: &'a str,
    pos: usize,
    path: &'a Path,
}

impl<'a> SubClassParser<'a> {
    fn new(text: &'a str, path: &'a Path) -> Self {
        SubClassParser { text, pos: 0, path }
    }

    fn line(&self, pos: usize) -> usize {
        1 + self.text[..pos].matches('\n').count()
    }

    fn error(&self, message: String) -> DataError {
        let pos = self.pos.min(self.text.len());
        let column = pos - self.text[..pos].rfind('\n').map_or(0, |i| i + 1) + 1;
        DataError::ListLine {
            path: self.path.to_path_buf(),
            line: self.line(pos),
            message: format!(
                "column {column}: {message}; a sub_class_file_list is a Python dict `{{class: [('IMG', 'LABEL'), ...], ...}}` as BAM writes it"
            ),
        }
    }

    fn peek(&self) -> Option<char> {
        self.text[self.pos..].chars().next()
    }

    fn skip_ws(&mut self) {
        while self.peek().is_some_and(char::is_whitespace) {
            self.pos += 1;
        }
    }

    /// Consumes `c` (after whitespace) or fails saying what was expected.
    fn expect(&mut self, c: char, what: &str) -> Result<(), DataError> {
        self.skip_ws();
        if self.peek() == Some(c) {
            self.pos += c.len_utf8();
            Ok(())
        } else {
            Err(self.error(format!("expected {what}, found {}", self.found())))
        }
    }

    /// Consumes `c` if it comes next (after whitespace).
    fn eat(&mut self, c: char) -> bool {
        self.skip_ws();
        let next = self.peek() == Some(c);
        if next {
            self.pos += c.len_utf8();
        }
        next
    }

    fn found(&self) -> String {
        match self.peek() {
            None => "the end of the file".into(),
            Some(c) => format!("`{c}`"),
        }
    }

    /// `item (, item)* ,?` up to `close`, each item parsed by `item`.
    fn sequence(
        &mut self,
        close: char,
        mut item: impl FnMut(&mut Self) -> Result<(), DataError>,
    ) -> Result<(), DataError> {
        loop {
            if self.eat(close) {
                return Ok(());
            }
            item(self)?;
            if !self.eat(',') {
                return self.expect(close, &format!("`,` or `{close}`"));
            }
        }
    }

    fn integer(&mut self) -> Result<usize, DataError> {
        self.skip_ws();
        let start = self.pos;
        while self.peek().is_some_and(|c| c.is_ascii_digit()) {
            self.pos += 1;
        }
        self.text[start..self.pos].parse().map_err(|_| {
            self.pos = start;
            self.error(format!("expected a class number, found {}", self.found()))
        })
    }

    fn string(&mut self) -> Result<String, DataError> {
        self.skip_ws();
        let quote = match self.peek() {
            Some(q @ ('\'' | '"')) => q,
            _ => return Err(self.error(format!("expected a quoted path, found {}", self.found()))),
        };
        let start = self.pos;
        self.pos += 1;
        let mut out = String::new();
        loop {
            let Some(c) = self.peek() else {
                self.pos = start;
                return Err(self.error("unterminated string".into()));
            };
            self.pos += c.len_utf8();
            match c {
                c if c == quote => return Ok(out),
                '\n' => {
                    self.pos = start;
                    return Err(self.error("unterminated string".into()));
                }
                '\\' => {
                    let Some(escaped) = self.peek() else { continue };
                    self.pos += escaped.len_utf8();
                    out.push(match escaped {
                        'n' => '\n',
                        't' => '\t',
                        other => other,
                    });
                }
                c => out.push(c),
            }
        }
    }

    fn parse(mut self) -> Result<ListFile, DataError> {
        let mut file = ListFile::default();
        let mut index: HashMap<(String, String), usize> = HashMap::new();
        let mut seen_classes = Vec::new();
        self.expect('{', "`{`")?;
        self.sequence('}', |p| {
            p.skip_ws();
            let class_start = p.pos;
            let class = p.integer()?;
            if seen_classes.contains(&class) {
                p.pos = class_start;
                return Err(p.error(format!("class {class} appears twice")));
            }
            seen_classes.push(class);
            file.classes.push((class, p.line(class_start)));
            p.expect(':', "`:` after the class number")?;
            p.expect('[', "`[` opening the class's list")?;
            p.sequence(']', |p| {
                p.skip_ws();
                let line = p.line(p.pos);
                let close = if p.eat('(') {
                    ')'
                } else if p.eat('[') {
                    ']'
                } else {
                    return Err(p.error(format!(
                        "expected an (image, label) pair, found {}",
                        p.found()
                    )));
                };
                let image = p.string()?;
                p.expect(',', "`,` between the image and the label")?;
                let label = p.string()?;
                p.eat(',');
                p.expect(close, &format!("`{close}` closing the pair"))?;
                let next = file.entries.len();
                let entry = *index.entry((image.clone(), label.clone())).or_insert(next);
                if entry == next {
                    file.entries.push(ListEntry { image, label });
                }
                file.claims.push(ClassClaim { class, entry, line });
                Ok(())
            })
        })?;
        self.skip_ws();
        if self.pos < self.text.len() {
            return Err(self.error(format!(
                "unexpected {} after the closing `}}`",
                self.found()
            )));
        }
        Ok(file)
    }
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

    #[test]
    fn malformed_lines_are_kept_beside_the_well_formed_ones() {
        let text = "a b\nc\nd e\nf g h\n";
        let file = parse_list_file(text, Path::new("l.txt")).unwrap();
        assert_eq!(file.entries, [entry("a", "b"), entry("d", "e")]);
        assert_eq!(
            file.malformed,
            [
                MalformedLine { line: 2, fields: 1 },
                MalformedLine { line: 4, fields: 3 }
            ]
        );
        let message = file.malformed[1].error(Path::new("l.txt")).to_string();
        assert!(
            message.starts_with("list file l.txt, line 4: expected `IMAGE LABEL`")
                && message.contains("found 3 field(s)"),
            "{message}"
        );
    }

    #[test]
    fn the_common_folder_of_absolute_paths_is_deeper_than_the_root() {
        let common = |paths: &[&str]| {
            let paths: Vec<&Path> = paths.iter().map(Path::new).collect();
            common_folder(&paths)
        };
        assert_eq!(
            common(&[
                "/h/u/VOC/JPEGImages/a.jpg",
                "/h/u/VOC/SegmentationClassAug/a.png"
            ]),
            Some(PathBuf::from("/h/u/VOC"))
        );
        assert_eq!(
            common(&["/h/u/VOC/JPEGImages/a.jpg"]),
            Some(PathBuf::from("/h/u/VOC/JPEGImages"))
        );
        assert_eq!(common(&["/a/x.jpg", "/b/x.png"]), None);
        assert_eq!(common(&["/x.jpg"]), None);
    }

    fn entry(image: &str, label: &str) -> ListEntry {
        ListEntry {
            image: image.into(),
            label: label.into(),
        }
    }

    #[test]
    fn sub_class_lists_round_trip_through_python_syntax() {
        let mut classes = BTreeMap::new();
        classes.insert(
            2,
            vec![
                entry("J/a.jpg", "S/a.png"),
                entry("J/it's.jpg", "S/b\\c.png"),
            ],
        );
        classes.insert(7, vec![entry("J/a.jpg", "S/a.png")]);
        classes.insert(9, vec![]);
        let text = format_sub_class_list(&classes);
        assert_eq!(
            text,
            r#"{2: [('J/a.jpg', 'S/a.png'), ("J/it's.jpg", 'S/b\\c.png')], 7: [('J/a.jpg', 'S/a.png')], 9: []}"#
        );
        let file = parse_list_file(&text, Path::new("s.txt")).unwrap();
        assert_eq!(
            file.entries,
            [
                entry("J/a.jpg", "S/a.png"),
                entry("J/it's.jpg", "S/b\\c.png")
            ]
        );
        let claims: Vec<(usize, usize)> = file.claims.iter().map(|c| (c.class, c.entry)).collect();
        assert_eq!(claims, [(2, 0), (2, 1), (7, 0)]);
        // Lists for pairs, double quotes, line breaks and trailing commas are Python too.
        let loose = "{\n 3: [[\"a\", \"b\"],\n  ('c', 'd',),],\n}\n";
        let file = parse_list_file(loose, Path::new("s.txt")).unwrap();
        assert_eq!(file.entries, [entry("a", "b"), entry("c", "d")]);
        assert_eq!(file.claims[1].line, 3);
    }

    #[test]
    fn malformed_sub_class_lists_name_the_file_and_line() {
        for (text, line, needle) in [
            ("{1: [('a', 'b')", 1, "`,` or `]`"),
            ("{1: [('a' 'b')]}", 1, "`,` between"),
            ("{x: []}", 1, "class number"),
            ("{1: [],\n 1: []}", 2, "twice"),
            ("{1: [('a', 'b)]}", 1, "unterminated"),
            ("{1: [__import__('os')]}", 1, "pair"),
            ("{1: []} trailing", 1, "after the closing"),
        ] {
            let message = parse_list_file(text, Path::new("sub.txt"))
                .unwrap_err()
                .to_string();
            assert!(
                message.contains(&format!("sub.txt, line {line}")) && message.contains(needle),
                "{text}: {message}"
            );
        }
    }
}
