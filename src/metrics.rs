//! IoU accumulation: per-class foreground IoU (mIoU) and FB-IoU, label 255 ignored.
//!
//! The counts follow the reference's `intersectionAndUnionGPU`: pixels whose label is 255 are set
//! aside, then for background (0) and foreground (1) the intersection and the union
//! (predicted + labelled − intersection) are counted. Counts are *summed* over episodes before any
//! division: a class's IoU is Σ intersection / Σ union over its episodes, never a mean of per-episode
//! ratios.

use tch::{Kind, Tensor};

use crate::data::IGNORE_LABEL;

/// The reference's guard against an empty union: such a ratio is 0, not NaN.
const EPSILON: f64 = 1e-10;

/// Summed pixel counts of one class, or of background/foreground over all episodes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Counts {
    intersection: u64,
    union: u64,
}

impl Counts {
    fn add(&mut self, intersection: i64, union: i64) {
        self.intersection += intersection as u64;
        self.union += union as u64;
    }

    fn iou(&self) -> f64 {
        self.intersection as f64 / (self.union as f64 + EPSILON)
    }
}

/// Sums of intersection and union over the episodes of an evaluation, for the fold's classes
/// (foreground only, as mIoU) and for background and foreground over all episodes (FB-IoU).
#[derive(Debug)]
pub struct IoUAccumulator {
    classes: Vec<usize>,
    per_class: Vec<Counts>,
    class_episodes: Vec<u64>,
    background: Counts,
    foreground: Counts,
    /// Counts added by [`IoUAccumulator::add_deferred`] and not yet read back: `[classes, 4]` i64
    /// on the predictions' device (issue 14).
    pending: Option<Tensor>,
}

impl IoUAccumulator {
    /// An empty accumulator for the fold's classes (dataset class ids), in the order given.
    pub fn new(classes: &[usize]) -> IoUAccumulator {
        IoUAccumulator {
            classes: classes.to_vec(),
            per_class: vec![Counts::default(); classes.len()],
            class_episodes: vec![0; classes.len()],
            background: Counts::default(),
            foreground: Counts::default(),
            pending: None,
        }
    }

    /// Adds the episodes of `pred` against `label`, all of class `class_id`.
    ///
    /// `pred`: `[H,W]` or `[N,H,W]` integer in {0, 1}; `label`: the same shape in {0, 1, 255}; on any
    /// device. Counting runs where the tensors are; one 4-number read comes back to the host.
    ///
    /// # Panics
    /// When `class_id` is not one of the accumulator's classes (the episode is not of this fold),
    /// or when the shapes differ.
    pub fn add(&mut self, pred: &Tensor, label: &Tensor, class_id: usize) {
        let per_episode = episode_counts(pred, label);
        let episodes = per_episode.size()[0] as u64;
        let counts = per_episode.sum_dim_intlist(0, false, Kind::Int64);
        let counts = Vec::<i64>::try_from(&counts.to_device(tch::Device::Cpu))
            .expect("a 1-D count tensor converts");
        self.record(&counts, class_id, episodes);
    }

    /// Adds a batch of episodes with one class each: `pred`, `label` `[N,H,W]`, `class_ids` N long.
    /// One `[N,4]` read comes back to the host.
    ///
    /// # Panics
    /// As [`IoUAccumulator::add`], and when `class_ids` is not N long.
    pub fn add_episodes(&mut self, pred: &Tensor, label: &Tensor, class_ids: &[usize]) {
        assert_eq!(
            pred.size()[0],
            class_ids.len() as i64,
            "one class id per episode of the batch"
        );
        let counts =
            Vec::<Vec<i64>>::try_from(&episode_counts(pred, label).to_device(tch::Device::Cpu))
                .expect("a 2-D count tensor converts");
        for (row, &class_id) in counts.iter().zip(class_ids) {
            self.record(row, class_id, 1);
        }
    }

    /// As [`IoUAccumulator::add_episodes`] (`pred`, `label` `[N,H,W]` or `[H,W]`), but nothing is
    /// read back: the counts are summed per class where the tensors are, and read by one
    /// [`IoUAccumulator::flush`] (once per evaluation seed rather than once per episode: no device
    /// synchronisation in the evaluation loop). Flush before reading any result.
    pub fn add_deferred(&mut self, pred: &Tensor, label: &Tensor, class_ids: &[usize]) {
        let counts = episode_counts(pred, label);
        assert_eq!(
            counts.size()[0],
            class_ids.len() as i64,
            "one class id per episode"
        );
        let slots: Vec<usize> = class_ids.iter().map(|&c| self.slot(c)).collect();
        let classes = self.classes.len() as i64;
        let pending = self
            .pending
            .get_or_insert_with(|| Tensor::zeros([classes, 4], (Kind::Int64, counts.device())));
        for (row, &slot) in slots.iter().enumerate() {
            let _ = pending.get(slot as i64).g_add_(&counts.get(row as i64));
            self.class_episodes[slot] += 1;
        }
    }

    /// Reads back the counts of [`IoUAccumulator::add_deferred`] (one device→host copy).
    pub fn flush(&mut self) {
        let Some(pending) = self.pending.take() else {
            return;
        };
        let rows = Vec::<Vec<i64>>::try_from(&pending.to_device(tch::Device::Cpu))
            .expect("a 2-D count tensor converts");
        for (slot, row) in rows.iter().enumerate() {
            self.background.add(row[0], row[1]);
            self.foreground.add(row[2], row[3]);
            self.per_class[slot].add(row[2], row[3]);
        }
    }

    fn slot(&self, class_id: usize) -> usize {
        self.classes
            .iter()
            .position(|&c| c == class_id)
            .unwrap_or_else(|| {
                panic!(
                    "episode class {class_id} is not one of the evaluated classes {:?}",
                    self.classes
                )
            })
    }

    fn record(&mut self, counts: &[i64], class_id: usize, episodes: u64) {
        let slot = self.slot(class_id);
        self.background.add(counts[0], counts[1]);
        self.foreground.add(counts[2], counts[3]);
        self.per_class[slot].add(counts[2], counts[3]);
        self.class_episodes[slot] += episodes;
    }

    fn assert_flushed(&self) {
        assert!(
            self.pending.is_none(),
            "IoUAccumulator: flush() the deferred counts before reading results"
        );
    }

    /// Mean over the fold's classes of each class's foreground IoU. As in the reference, a class
    /// met in no episode counts as 0 (its union is empty).
    pub fn miou(&self) -> f64 {
        self.assert_flushed();
        if self.classes.is_empty() {
            return 0.0;
        }
        self.per_class.iter().map(Counts::iou).sum::<f64>() / self.classes.len() as f64
    }

    /// Mean of the background IoU and the foreground IoU, each summed over every episode.
    pub fn fb_iou(&self) -> f64 {
        self.assert_flushed();
        (self.background.iou() + self.foreground.iou()) / 2.0
    }

    /// Each class's foreground IoU, in the order of the classes given to [`IoUAccumulator::new`].
    pub fn class_iou(&self) -> Vec<(usize, f64)> {
        self.assert_flushed();
        self.classes
            .iter()
            .zip(&self.per_class)
            .map(|(&class, counts)| (class, counts.iou()))
            .collect()
    }

    /// Episodes counted for each class, in the order of [`IoUAccumulator::class_iou`].
    pub fn class_episodes(&self) -> Vec<(usize, u64)> {
        self.classes
            .iter()
            .copied()
            .zip(self.class_episodes.iter().copied())
            .collect()
    }

    /// Episodes counted in all.
    pub fn episodes(&self) -> u64 {
        self.class_episodes.iter().sum()
    }
}

/// Per-episode counts `[N,4]` = (background ∩, background ∪, foreground ∩, foreground ∪), on the
/// tensors' device.
fn episode_counts(pred: &Tensor, label: &Tensor) -> Tensor {
    assert_eq!(
        pred.size(),
        label.size(),
        "prediction and label shapes differ"
    );
    let (pred, label) = match pred.dim() {
        2 => (pred.unsqueeze(0), label.unsqueeze(0)),
        3 => (pred.shallow_clone(), label.shallow_clone()),
        d => panic!("prediction must be [H,W] or [N,H,W], got {d} dimensions"),
    };
    let valid = label.ne(i64::from(IGNORE_LABEL));
    let count = |t: &Tensor| t.sum_dim_intlist([-2i64, -1].as_slice(), false, Kind::Int64);
    let pair = |value: i64| {
        let predicted = pred.eq(value).logical_and(&valid);
        let labelled = label.eq(value);
        (
            count(&predicted.logical_and(&labelled)),
            count(&predicted.logical_or(&labelled)),
        )
    };
    let (bg_i, bg_u) = pair(0);
    let (fg_i, fg_u) = pair(1);
    Tensor::stack(&[bg_i, bg_u, fg_i, fg_u], 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mask(rows: &[&[i64]]) -> Tensor {
        let flat: Vec<i64> = rows.iter().flat_map(|r| r.iter().copied()).collect();
        Tensor::from_slice(&flat).view([rows.len() as i64, rows[0].len() as i64])
    }

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-9
    }

    #[test]
    fn deferred_counts_equal_immediate_ones() {
        tch::manual_seed(5);
        let cpu = (Kind::Int64, tch::Device::Cpu);
        let pred = Tensor::randint(2, [5, 11, 9], cpu);
        let label = Tensor::randint(3, [5, 11, 9], cpu);
        let label = label.where_self(&label.ne(2), &label.full_like(255));
        let classes = [4, 1, 4, 7, 1];
        let mut now = IoUAccumulator::new(&[1, 4, 7, 9]);
        now.add_episodes(&pred, &label, &classes);
        let mut later = IoUAccumulator::new(&[1, 4, 7, 9]);
        later.add_deferred(&pred.narrow(0, 0, 3), &label.narrow(0, 0, 3), &classes[..3]);
        // One [H,W] episode, as the original-resolution path adds them.
        later.add_deferred(&pred.get(3), &label.get(3), &classes[3..4]);
        later.add_deferred(&pred.get(4), &label.get(4), &classes[4..]);
        assert_eq!(later.class_episodes(), now.class_episodes());
        later.flush();
        assert_eq!(later.class_iou(), now.class_iou());
        assert_eq!(later.fb_iou(), now.fb_iou());
        assert_eq!(later.miou(), now.miou());
    }

    #[test]
    fn ignored_pixels_count_for_nothing() {
        let mut acc = IoUAccumulator::new(&[7]);
        // Foreground: label {(0,0),(0,1)}, pred {(0,1),(1,1)} plus a predicted pixel under 255.
        let label = mask(&[&[1, 1, 255], &[0, 0, 0]]);
        let pred = mask(&[&[0, 1, 1], &[0, 1, 0]]);
        acc.add(&pred, &label, 7);
        // fg: ∩ = 1, ∪ = 3; bg: label {(1,0),(1,1),(1,2)}, pred {(0,0),(1,0),(1,2)} → ∩ 2, ∪ 4.
        assert!(close(acc.miou(), 1.0 / 3.0), "{}", acc.miou());
        assert!(close(acc.fb_iou(), (2.0 / 4.0 + 1.0 / 3.0) / 2.0));
    }

    #[test]
    fn empty_prediction_scores_zero_foreground() {
        let mut acc = IoUAccumulator::new(&[1]);
        let label = mask(&[&[1, 1], &[0, 0]]);
        acc.add(
            &Tensor::zeros([2, 2], (Kind::Int64, tch::Device::Cpu)),
            &label,
            1,
        );
        assert!(close(acc.miou(), 0.0));
        // bg: ∩ 2, ∪ 4.
        assert!(close(acc.fb_iou(), 0.25));
    }

    #[test]
    fn empty_foreground_adds_nothing_to_its_class_but_counts_background() {
        let mut acc = IoUAccumulator::new(&[3]);
        let empty = mask(&[&[0, 0], &[0, 255]]);
        acc.add(&mask(&[&[0, 0], &[0, 1]]), &empty, 3);
        // Nothing labelled or predicted as foreground (the 1 is under 255): the class stays 0/0.
        assert_eq!(acc.class_iou(), vec![(3, 0.0)]);
        assert!(close(acc.fb_iou(), 0.5));
        // A second episode decides the class alone.
        acc.add(&mask(&[&[1, 0]]), &mask(&[&[1, 1]]), 3);
        assert!(close(acc.miou(), 0.5));
        assert_eq!(acc.class_episodes(), vec![(3, 2)]);
    }

    #[test]
    fn classes_met_in_several_episodes_sum_before_dividing() {
        let mut acc = IoUAccumulator::new(&[1, 2]);
        // Class 1, episode a: ∩ 1, ∪ 1 (ratio 1). Episode b: ∩ 1, ∪ 4 (ratio 1/4).
        acc.add(&mask(&[&[1, 0, 0, 0]]), &mask(&[&[1, 0, 0, 0]]), 1);
        acc.add(&mask(&[&[1, 0, 0, 0]]), &mask(&[&[1, 1, 1, 1]]), 1);
        // Class 2: ∩ 0, ∪ 2.
        acc.add(&mask(&[&[1, 0, 0, 0]]), &mask(&[&[0, 1, 0, 0]]), 2);
        let class_iou = acc.class_iou();
        assert_eq!(class_iou[0].0, 1);
        assert!(
            close(class_iou[0].1, 2.0 / 5.0),
            "not the mean of ratios 0.625"
        );
        assert!(close(class_iou[1].1, 0.0));
        assert!(close(acc.miou(), 0.2));
        // bg over the three episodes: ∩ 3+0+2 = 5, ∪ 3+3+4 = 10; fg: ∩ 2, ∪ 7.
        assert!(close(acc.fb_iou(), (0.5 + 2.0 / 7.0) / 2.0));
        assert_eq!(acc.episodes(), 3);
    }

    #[test]
    fn unmet_class_counts_as_zero_in_miou() {
        let mut acc = IoUAccumulator::new(&[1, 2]);
        acc.add(&mask(&[&[1]]), &mask(&[&[1]]), 1);
        assert!(close(acc.miou(), 0.5));
    }

    #[test]
    fn batch_with_classes_equals_episode_by_episode() {
        let pred = Tensor::from_slice(&[1i64, 0, 1, 1, 0, 1, 1, 0]).view([2, 2, 2]);
        let label = Tensor::from_slice(&[1i64, 1, 0, 255, 0, 1, 0, 0]).view([2, 2, 2]);
        let mut batch = IoUAccumulator::new(&[4, 9]);
        batch.add_episodes(&pred, &label, &[9, 4]);
        let mut single = IoUAccumulator::new(&[4, 9]);
        single.add(&pred.get(0), &label.get(0), 9);
        single.add(&pred.get(1), &label.get(1), 4);
        assert_eq!(batch.class_iou(), single.class_iou());
        assert_eq!(batch.fb_iou(), single.fb_iou());
        // A [N,H,W] add of one class sums its episodes.
        let mut stacked = IoUAccumulator::new(&[4, 9]);
        stacked.add(&pred, &label, 4);
        assert_eq!(stacked.class_episodes(), vec![(4, 2), (9, 0)]);
        assert_eq!(stacked.fb_iou(), single.fb_iou());
    }

    #[test]
    #[should_panic(expected = "not one of the evaluated classes")]
    fn foreign_class_is_refused() {
        IoUAccumulator::new(&[1]).add(&mask(&[&[1]]), &mask(&[&[1]]), 2);
    }
}
