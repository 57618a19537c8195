//! One split of a fold: its query images, per-class support lists and episode construction.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use super::classes::FoldClasses;
use super::episode::{Episode, EpisodeDraw, EpisodeImage, Split};
use super::index::{ClassIndex, MIN_CLASS_PIXELS};
use super::lists::{format_data_list, format_sub_class_list, ListEntry};
use super::raster::{read_image, read_label, LabelMap, RgbImage};
use super::transform::{val_resize, TrainTransform};
use super::DataError;
use crate::config::{Config, TrainFilter};

/// One split of one fold written by [`write_bam_fold_lists`].
#[derive(Debug, Clone)]
pub struct ExportedLists {
    pub split: Split,
    pub fold: usize,
    /// Query images (lines of the data list).
    pub images: usize,
    pub data_list: PathBuf,
    pub sub_class_list: PathBuf,
}

/// Writes BAM's lists of every fold (0..=3) of `config`'s dataset, as BAM's `fss_list` folder
/// holds them: `dir/train/` under `train_filter`, `dir/val/` under PFENet's rule (what validation
/// uses). Each list is indexed once; the folds are derived from the index.
pub fn write_bam_fold_lists(config: &Config, dir: &Path) -> Result<Vec<ExportedLists>, DataError> {
    let mut written = Vec::new();
    for split in [Split::Train, Split::Val] {
        for fold in 0..4 {
            let config = Config {
                split: fold,
                ..config.clone()
            };
            let dataset = FewShotDataset::open_lists(&config, split)?;
            let (data_list, sub_class_list) =
                dataset.write_bam_lists(&config.data_root, &dir.join(split.name()), fold)?;
            written.push(ExportedLists {
                split,
                fold,
                images: dataset.query_count(),
                data_list,
                sub_class_list,
            });
        }
    }
    Ok(written)
}

/// Refuses a `sub_class_file_list` (its `listed` classes with their lines; none for the line
/// format) of another fold or split than `config`'s `split`: it would mix novel objects into
/// training (or base classes into validation) without any other sign. BAM writes every class of
/// its fold's split as a key, so the keys tell which fold and split the file was written for.
pub(super) fn check_listed_classes(
    config: &Config,
    split: Split,
    list: &Path,
    listed: &[(usize, usize)],
) -> Result<(), DataError> {
    let Some(&(_, first_line)) = listed.first() else {
        return Ok(());
    };
    let classes = FoldClasses::of(config).of_split(split);
    let kind = |split: Split| match split {
        Split::Train => "training",
        Split::Val => "novel",
    };
    let (fold, split_kind) = (config.split, kind(split));
    let (line, problem) = if let Some(&(class, line)) =
        listed.iter().find(|(c, _)| !classes.contains(c))
    {
        (
            line,
            format!("class {class} is not a {split_kind} class of fold {fold} ({classes:?})"),
        )
    } else if let Some(class) = classes
        .iter()
        .find(|&&c| !listed.iter().any(|&(l, _)| l == c))
    {
        (
            first_line,
            format!("the {split_kind} class {class} of fold {fold} has no entry, though BAM writes every class of its fold's split (even one without images)"),
        )
    } else {
        return Ok(());
    };
    let mut keys: Vec<usize> = listed.iter().map(|&(c, _)| c).collect();
    keys.sort_unstable();
    let written_for = (0..4)
        .flat_map(|f| [(f, Split::Train), (f, Split::Val)])
        .find(|&(f, s)| {
            FoldClasses::new(config.use_coco, config.use_split_coco, f).of_split(s) == keys
        });
    let fix = format!(
        "use `{}/sub_class_file_list_{fold}.txt` of BAM's lists",
        split.name()
    );
    let cause = match written_for {
        Some((f, s)) if s == split => format!(
            "this sub_class_file_list holds the {} classes of fold {f} (BAM's `{}/sub_class_file_list_{f}.txt`): {fix}, or set `split: {f}`",
            kind(s),
            s.name()
        ),
        Some((f, s)) => format!(
            "this sub_class_file_list holds the {} classes of fold {f} (BAM's `{}/sub_class_file_list_{f}.txt`), not the {split_kind} classes: {fix}",
            kind(s),
            s.name()
        ),
        None => format!("this sub_class_file_list belongs to another fold or split: {fix} or change `split`"),
    };
    Err(DataError::ListLine {
        path: list.to_path_buf(),
        line,
        message: format!("{problem}; {cause}"),
    })
}

/// A query candidate: an image with at least one eligible class of the split.
#[derive(Debug, Clone)]
struct DatasetItem {
    image: PathBuf,
    label: PathBuf,
    /// The split's classes present in the label at all (the query's class is drawn among these).
    classes: Vec<usize>,
}

#[derive(Debug, Clone)]
enum EpisodeTransform {
    Train(TrainTransform),
    Val { size: usize },
}

/// Lists + fold classes + per-class index, for one split.
#[derive(Debug)]
pub struct FewShotDataset {
    split: Split,
    list: PathBuf,
    classes: Vec<usize>,
    /// The query list: images with at least one eligible class of the split, in list order.
    items: Vec<DatasetItem>,
    /// For each class of the split, the items (indices into `items`) where it is eligible.
    class_items: BTreeMap<usize, Vec<usize>>,
    shot: usize,
    transform: EpisodeTransform,
    episodes_per_epoch: usize,
}

impl FewShotDataset {
    /// Indexes the split's list (cached, see [`super::index`]) and builds the query and support
    /// lists of the fold. Fails early, naming the class, when a class of the split has fewer than
    /// `shot + 1` eligible images (the reference would loop forever drawing supports).
    pub fn open(config: &Config, split: Split) -> Result<FewShotDataset, DataError> {
        let dataset = FewShotDataset::open_lists(config, split)?;
        dataset.check_support_counts()?;
        tracing::info!(
            split = split.name(),
            list = %dataset.list.display(),
            queries = dataset.items.len(),
            classes = ?dataset.classes,
            "few-shot dataset ready"
        );
        Ok(dataset)
    }

    /// [`FewShotDataset::open`] without the support-count check: the fold's lists as they are,
    /// e.g. to export them.
    pub fn open_lists(config: &Config, split: Split) -> Result<FewShotDataset, DataError> {
        let (list, key) = match split {
            Split::Train => (&config.train_list, "train_list"),
            Split::Val => (&config.val_list, "val_list"),
        };
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        let cache_dirs = [config.data_root.clone(), config.save_path.clone()];
        let index = ClassIndex::build(&config.data_root, list, key, &cache_dirs, threads)?;
        check_listed_classes(config, split, list, &index.listed_classes)?;
        let classes = FoldClasses::of(config).of_split(split);
        let transform = match split {
            Split::Train => EpisodeTransform::Train(TrainTransform::from_config(config)),
            Split::Val => EpisodeTransform::Val {
                size: config.val_size as usize,
            },
        };
        // Validation keeps PFENet's rule under both filters, as BAM does.
        let filter = match split {
            Split::Train => config.train_filter,
            Split::Val => TrainFilter::Pfenet,
        };
        let mut dataset = FewShotDataset::from_index(
            &index,
            &config.data_root,
            list,
            split,
            classes,
            filter,
            config.shot,
            transform,
        );
        if let (Split::Train, Some(episodes)) = (split, config.train_episodes) {
            dataset.episodes_per_epoch = episodes;
        }
        Ok(dataset)
    }

    /// The query and support lists of `classes` under `filter` (REFERENCE §4 and §8).
    #[allow(clippy::too_many_arguments)]
    fn from_index(
        index: &ClassIndex,
        data_root: &Path,
        list: &Path,
        split: Split,
        classes: Vec<usize>,
        filter: TrainFilter,
        shot: usize,
        transform: EpisodeTransform,
    ) -> FewShotDataset {
        let mut items = Vec::new();
        let mut class_items: BTreeMap<usize, Vec<usize>> =
            classes.iter().map(|&c| (c, Vec::new())).collect();
        for record in &index.items {
            // BAM's filter intersection: any other class in the label, whatever its size, drops
            // the image, so novel objects never appear (as background) in training.
            if filter == TrainFilter::Bam
                && record
                    .class_pixels
                    .iter()
                    .any(|&(c, _)| !classes.contains(&(c as usize)))
            {
                continue;
            }
            let eligible: Vec<usize> = classes
                .iter()
                .copied()
                .filter(|&c| record.is_eligible(c))
                .collect();
            if eligible.is_empty() {
                continue;
            }
            for c in eligible {
                class_items
                    .get_mut(&c)
                    .expect("a split class")
                    .push(items.len());
            }
            items.push(DatasetItem {
                image: data_root.join(&record.image),
                label: data_root.join(&record.label),
                classes: classes
                    .iter()
                    .copied()
                    .filter(|&c| record.pixels(c) > 0)
                    .collect(),
            });
        }
        FewShotDataset {
            split,
            list: list.to_path_buf(),
            classes,
            episodes_per_epoch: items.len(),
            items,
            class_items,
            shot,
            transform,
        }
    }

    /// Fails, naming the class, when a class has fewer than `shot + 1` eligible images.
    fn check_support_counts(&self) -> Result<(), DataError> {
        let shot = self.shot;
        match self.class_items.iter().find(|(_, v)| v.len() < shot + 1) {
            Some((&class, found)) => Err(DataError::TooFewImages {
                class,
                found: found.len(),
                needed: shot + 1,
                min_pixels: MIN_CLASS_PIXELS,
                list: self.list.clone(),
                split: self.split.name(),
                shot,
            }),
            None => Ok(()),
        }
    }

    /// The query list as list entries relative to `data_root` (as the list file wrote them).
    fn entry(&self, item: usize, data_root: &Path) -> ListEntry {
        let relative = |path: &Path| {
            path.strip_prefix(data_root)
                .unwrap_or(path)
                .to_string_lossy()
                .into_owned()
        };
        ListEntry {
            image: relative(&self.items[item].image),
            label: relative(&self.items[item].label),
        }
    }

    /// Writes the split's lists in BAM's formats into `dir`: `data_list_{fold}.txt` (the query
    /// images) and `sub_class_file_list_{fold}.txt` (each class's support images), with paths
    /// relative to `data_root`. Returns the two files.
    pub fn write_bam_lists(
        &self,
        data_root: &Path,
        dir: &Path,
        fold: usize,
    ) -> Result<(PathBuf, PathBuf), DataError> {
        let entries: Vec<ListEntry> = (0..self.items.len())
            .map(|i| self.entry(i, data_root))
            .collect();
        let classes: BTreeMap<usize, Vec<ListEntry>> = self
            .class_items
            .iter()
            .map(|(&class, items)| (class, items.iter().map(|&i| entries[i].clone()).collect()))
            .collect();
        let write = |name: String, text: String| {
            let path = dir.join(name);
            std::fs::create_dir_all(dir)
                .and_then(|()| std::fs::write(&path, text))
                .map_err(|source| DataError::Write {
                    path: path.clone(),
                    source,
                })?;
            Ok(path)
        };
        Ok((
            write(format!("data_list_{fold}.txt"), format_data_list(&entries))?,
            write(
                format!("sub_class_file_list_{fold}.txt"),
                format_sub_class_list(&classes),
            )?,
        ))
    }

    pub fn split(&self) -> Split {
        self.split
    }

    /// The list file this split was read from.
    pub fn list(&self) -> &Path {
        &self.list
    }

    /// Episodes in one epoch of this split (train: `train_episodes`, by default the number of query
    /// images, the reference's epoch; val: the number of query images).
    pub fn episodes_per_epoch(&self) -> usize {
        self.episodes_per_epoch
    }

    /// The split's class ids (1-based dataset ids): the fold's training or novel classes.
    pub fn classes(&self) -> &[usize] {
        &self.classes
    }

    /// Support images per episode (K).
    pub fn shot(&self) -> usize {
        self.shot
    }

    /// Number of query images (images with at least one eligible class of the split).
    pub fn query_count(&self) -> usize {
        self.items.len()
    }

    /// Number of images where `class` is eligible (its support list).
    pub fn support_count(&self, class: usize) -> usize {
        self.class_items.get(&class).map_or(0, Vec::len)
    }

    /// (height, width) of every episode image.
    pub fn output_size(&self) -> (usize, usize) {
        match &self.transform {
            EpisodeTransform::Train(t) => (t.height, t.width),
            EpisodeTransform::Val { size } => (*size, *size),
        }
    }

    /// Image and label paths of query item `item` (the numbering of [`EpisodeDraw`]'s items).
    pub fn item_paths(&self, item: usize) -> (&Path, &Path) {
        (&self.items[item].image, &self.items[item].label)
    }

    pub(crate) fn query_classes(&self, item: usize) -> &[usize] {
        &self.items[item].classes
    }

    pub(crate) fn support_list(&self, class: usize) -> &[usize] {
        &self.class_items[&class]
    }

    /// Reads the image and label of `item`, checks that their sizes agree, binarises for `class`.
    fn read_pair(&self, item: usize, class: usize) -> Result<(RgbImage, LabelMap), DataError> {
        let item = &self.items[item];
        let label = read_label(&item.label)?;
        let image = read_image(&item.image)?;
        if (image.height, image.width) != (label.height, label.width) {
            return Err(DataError::SizeMismatch {
                image: item.image.clone(),
                label: item.label.clone(),
                image_size: (image.height, image.width),
                label_size: (label.height, label.width),
            });
        }
        Ok((image, label.binarised(class)))
    }

    /// Decodes and transforms the episode `draw` describes; augmentation draws continue its stream.
    pub fn load_episode(&self, draw: EpisodeDraw) -> Result<Episode, DataError> {
        let EpisodeDraw {
            index,
            query,
            class_id,
            supports,
            mut rng,
            ..
        } = draw;
        let mut load = |item: usize| -> Result<(EpisodeImage, LabelMap), DataError> {
            let (image, label) = self.read_pair(item, class_id)?;
            let (image, out_label) = match &self.transform {
                EpisodeTransform::Train(t) => t.apply(&image, &label, &mut rng),
                EpisodeTransform::Val { size } => val_resize(&image, &label, *size),
            };
            let path = self.items[item].image.clone();
            Ok((
                EpisodeImage {
                    path,
                    image,
                    label: out_label,
                },
                label,
            ))
        };
        let (query_image, original) = load(query)?;
        let supports = supports
            .into_iter()
            .map(|s| load(s).map(|(image, _)| image))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Episode {
            index,
            class_id,
            query: query_image,
            supports,
            original_label: (self.split == Split::Val).then_some(original),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sub_class_file_list_of_another_fold_or_split_is_named_by_its_keys() {
        let config = Config {
            split: 1,
            ..Config::default()
        };
        let keys = |classes: Vec<usize>| -> Vec<(usize, usize)> {
            classes.into_iter().map(|c| (c, 1)).collect()
        };
        let check = |split, listed: Vec<usize>| {
            check_listed_classes(&config, split, Path::new("s.txt"), &keys(listed))
                .map_err(|e| e.to_string())
        };
        let fold = |f| FoldClasses::new(false, false, f);
        assert!(check(Split::Train, fold(1).train).is_ok());
        assert!(check(Split::Val, fold(1).novel).is_ok());
        // The line format lists no classes.
        assert!(check(Split::Train, vec![]).is_ok());
        let message = check(Split::Train, fold(0).train).unwrap_err();
        assert!(
            message.contains("class 6 is not a training class of fold 1")
                && message.contains("holds the training classes of fold 0")
                && message.contains("use `train/sub_class_file_list_1.txt`")
                && message.contains("or set `split: 0`"),
            "{message}"
        );
        let message = check(Split::Val, fold(1).train).unwrap_err();
        assert!(
            message.contains("holds the training classes of fold 1")
                && message.contains("not the novel classes: use `val/sub_class_file_list_1.txt`"),
            "{message}"
        );
        // Keys of no fold: a class of the split missing says the file is not this split's.
        let message = check(Split::Val, vec![6, 7, 9, 10]).unwrap_err();
        assert!(
            message.contains("the novel class 8 of fold 1 has no entry")
                && message.contains("belongs to another fold or split"),
            "{message}"
        );
    }
}
