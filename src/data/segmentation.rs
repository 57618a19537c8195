//! Whole-image supervised segmentation over a fold's base classes: the data of BAM's first stage
//! (training the PSPNet base learner, `train_base.py` with `util/dataset.py`'s `BaseData`).
//!
//! Labels are mapped at load time, as `BaseData` does: the fold's training (base) classes become
//! 1..=N in ascending order, every other class (the novel ones) background 0, and 255 stays ignored.
//! BAM also ships pre-mapped `base_annotation` PNGs for its meta stage; mapping here makes them
//! unnecessary. Training images get BAM's base-stage augmentation (the episodic chain of
//! [`TrainTransform`]: scale, rotation, blur, flip, crop — BAM's base configs only widen the scale
//! range to [0.5, 2.0] and crop 417), validation images PFENet's resize onto the canvas.

use std::path::PathBuf;

use tch::Tensor;

use crate::config::Config;
use crate::data::classes::FoldClasses;
use crate::data::lists::{read_list, ListEntry};
use crate::data::raster::{read_image, read_label, LabelMap, RgbImage};
use crate::data::rng::EpisodeRng;
use crate::data::transform::{normalise_into, val_resize, TrainTransform, IGNORE_LABEL};
use crate::data::{DataError, Split};

/// RNG stream of the base stage's augmentation (apart from the episodic streams).
const BASE_AUGMENT_STREAM: u64 = 0xBA5E;

/// The label mapping of a fold's base stage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BaseClassMap {
    /// The fold's base classes (dataset ids), ascending: class `base[i]` becomes `i + 1`.
    pub base: Vec<usize>,
    table: [u8; 256],
}

impl BaseClassMap {
    pub fn of(config: &Config) -> BaseClassMap {
        BaseClassMap::new(&FoldClasses::of(config).train)
    }

    pub fn new(base: &[usize]) -> BaseClassMap {
        // Everything not a base class is background, 255 stays ignored.
        let mut table = [0u8; 256];
        table[usize::from(IGNORE_LABEL)] = IGNORE_LABEL;
        for (i, &class) in base.iter().enumerate() {
            table[class] = (i + 1) as u8;
        }
        BaseClassMap {
            base: base.to_vec(),
            table,
        }
    }

    /// Output classes including background.
    pub fn classes(&self) -> usize {
        self.base.len() + 1
    }

    /// The base learner's channel of dataset class `class` (1-based), `None` for a novel class.
    pub fn channel(&self, class: usize) -> Option<usize> {
        self.base.iter().position(|&c| c == class).map(|i| i + 1)
    }

    pub fn map(&self, label: &LabelMap) -> LabelMap {
        LabelMap {
            height: label.height,
            width: label.width,
            data: label
                .data
                .iter()
                .map(|&v| self.table[usize::from(v)])
                .collect(),
        }
    }
}

/// The images of a list with base-class labels.
pub struct SegmentationDataset {
    data_root: PathBuf,
    entries: Vec<ListEntry>,
    map: BaseClassMap,
    split: Split,
    transform: TrainTransform,
    val_size: usize,
}

/// A batch: images `[B, 3, H, W]` (normalised) and labels `[B, H, W]` (int64, 255 ignored).
pub struct SegmentationBatch {
    pub images: Tensor,
    pub labels: Tensor,
}

impl SegmentationDataset {
    /// Every image of `config`'s train or val list (BAM's base stage uses them all, whatever
    /// `train_filter` says: novel classes become background).
    pub fn open(config: &Config, split: Split) -> Result<SegmentationDataset, DataError> {
        let (list, key) = match split {
            Split::Train => (&config.train_list, "train_list"),
            Split::Val => (&config.val_list, "val_list"),
        };
        Ok(SegmentationDataset {
            data_root: config.data_root.clone(),
            entries: read_list(list, key, &config.data_root)?,
            map: BaseClassMap::of(config),
            split,
            transform: TrainTransform::from_config(config),
            val_size: config.val_size as usize,
        })
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn class_map(&self) -> &BaseClassMap {
        &self.map
    }

    /// Item `index`, augmented with draws from (`seed`, `draw`) for training, resized for
    /// validation; labels mapped to base classes.
    pub fn load(
        &self,
        index: usize,
        seed: u64,
        draw: u64,
    ) -> Result<(RgbImage, LabelMap), DataError> {
        let entry = &self.entries[index];
        let image = read_image(&entry.image_path(&self.data_root))?;
        let label = self
            .map
            .map(&read_label(&entry.label_path(&self.data_root))?);
        Ok(match self.split {
            Split::Train => {
                let mut rng = EpisodeRng::new(seed, BASE_AUGMENT_STREAM, draw);
                self.transform.apply(&image, &label, &mut rng)
            }
            Split::Val => val_resize(&image, &label, self.val_size),
        })
    }

    /// Items `indices` as one batch, decoded and augmented on up to `workers` threads; training
    /// draw `draw_base + i` for the i-th (so the batch does not depend on `workers`).
    pub fn batch(
        &self,
        indices: &[usize],
        seed: u64,
        draw_base: u64,
        workers: usize,
    ) -> Result<SegmentationBatch, DataError> {
        let per_thread = indices.len().div_ceil(workers.max(1)).max(1);
        let items = std::thread::scope(|scope| {
            let handles: Vec<_> = indices
                .chunks(per_thread)
                .enumerate()
                .map(|(c, chunk)| {
                    scope.spawn(move || {
                        chunk
                            .iter()
                            .enumerate()
                            .map(|(i, &index)| {
                                self.load(index, seed, draw_base + (c * per_thread + i) as u64)
                            })
                            .collect::<Result<Vec<_>, _>>()
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("an image loader thread panicked"))
                .collect::<Result<Vec<_>, _>>()
        })?;
        let items: Vec<_> = items.into_iter().flatten().collect();
        Ok(to_batch(&items))
    }

    /// The list's path of item `index` (for messages).
    pub fn image_path(&self, index: usize) -> PathBuf {
        self.entries[index].image_path(&self.data_root)
    }
}

fn to_batch(items: &[(RgbImage, LabelMap)]) -> SegmentationBatch {
    let (h, w) = (items[0].0.height, items[0].0.width);
    let mut pixels = vec![0f32; items.len() * 3 * h * w];
    let mut labels = Vec::with_capacity(items.len() * h * w);
    for (i, (image, label)) in items.iter().enumerate() {
        normalise_into(image, &mut pixels[i * 3 * h * w..(i + 1) * 3 * h * w]);
        labels.extend(label.data.iter().map(|&v| i64::from(v)));
    }
    let b = items.len() as i64;
    SegmentationBatch {
        images: Tensor::from_slice(&pixels).reshape([b, 3, h as i64, w as i64]),
        labels: Tensor::from_slice(&labels).reshape([b, h as i64, w as i64]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fold_zero_maps_base_classes_in_order_and_novel_to_background() {
        let map = BaseClassMap::of(&Config::default());
        assert_eq!(map.classes(), 16);
        let label = LabelMap {
            height: 1,
            width: 6,
            data: vec![0, 1, 5, 6, 20, 255],
        };
        // Fold 0: novel 1..=5, base 6..=20 → 1..=15.
        assert_eq!(map.map(&label).data, vec![0, 0, 0, 1, 15, 255]);
        assert_eq!(map.channel(6), Some(1));
        assert_eq!(map.channel(3), None);
    }
}
