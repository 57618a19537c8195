//! Which dataset classes a fold trains on and which it holds out as novel (PASCAL-5i, COCO-20i).

use super::Split;
use crate::config::Config;

/// The two disjoint class sets of one fold, in ascending order, 1-based dataset ids.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FoldClasses {
    /// Classes whose episodes train the model (the reference's `sub_list`).
    pub train: Vec<usize>,
    /// Held-out classes of validation and evaluation (the reference's `sub_val_list`).
    pub novel: Vec<usize>,
}

impl FoldClasses {
    /// The fold of `config`: `use_coco`, `use_split_coco` and `split` (0..=3).
    pub fn of(config: &Config) -> FoldClasses {
        FoldClasses::new(config.use_coco, config.use_split_coco, config.split)
    }

    /// The classes of `split`'s episodes: the training classes, or the novel ones.
    pub fn of_split(self, split: Split) -> Vec<usize> {
        match split {
            Split::Train => self.train,
            Split::Val => self.novel,
        }
    }

    /// PASCAL-5i: novel 5i+1..5i+5 of 1..20. COCO-20i: novel i+1, i+5, ..., i+77 of 1..80 with
    /// `use_split_coco` (interleaved), else 20i+1..20i+20.
    pub fn new(use_coco: bool, use_split_coco: bool, fold: usize) -> FoldClasses {
        assert!(fold < 4, "fold {fold} must be in 0..=3");
        let (count, is_novel): (usize, Box<dyn Fn(usize) -> bool>) = if !use_coco {
            (20, Box::new(move |c| (c - 1) / 5 == fold))
        } else if use_split_coco {
            (80, Box::new(move |c| (c - 1) % 4 == fold))
        } else {
            (80, Box::new(move |c| (c - 1) / 20 == fold))
        };
        let (novel, train) = (1..=count).partition(|&c| is_novel(c));
        FoldClasses { train, novel }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The lists PFENet's `SemData.__init__` builds, written out as its `range` calls.
    fn reference(use_coco: bool, use_split_coco: bool, fold: usize) -> (Vec<usize>, Vec<usize>) {
        let r = |a: usize, b: usize| (a..b).collect::<Vec<_>>();
        let cat = |a: Vec<usize>, b: Vec<usize>| a.into_iter().chain(b).collect::<Vec<_>>();
        let complement = |novel: &Vec<usize>| (1..81).filter(|c| !novel.contains(c)).collect();
        if !use_coco {
            match fold {
                3 => (r(1, 16), r(16, 21)),
                2 => (cat(r(1, 11), r(16, 21)), r(11, 16)),
                1 => (cat(r(1, 6), r(11, 21)), r(6, 11)),
                _ => (r(6, 21), r(1, 6)),
            }
        } else if use_split_coco {
            let novel: Vec<usize> = match fold {
                3 => (4..81).step_by(4).collect(),
                2 => (3..80).step_by(4).collect(),
                1 => (2..79).step_by(4).collect(),
                _ => (1..78).step_by(4).collect(),
            };
            (complement(&novel), novel)
        } else {
            match fold {
                3 => (r(1, 61), r(61, 81)),
                2 => (cat(r(1, 41), r(61, 81)), r(41, 61)),
                1 => (cat(r(1, 21), r(41, 81)), r(21, 41)),
                _ => (r(21, 81), r(1, 21)),
            }
        }
    }

    #[test]
    fn every_fold_matches_the_reference() {
        for (use_coco, use_split_coco) in [(false, false), (true, true), (true, false)] {
            for fold in 0..4 {
                let got = FoldClasses::new(use_coco, use_split_coco, fold);
                let (train, novel) = reference(use_coco, use_split_coco, fold);
                assert_eq!(
                    got.train, train,
                    "coco {use_coco} split {use_split_coco} fold {fold}"
                );
                assert_eq!(
                    got.novel, novel,
                    "coco {use_coco} split {use_split_coco} fold {fold}"
                );
                let per_fold = if use_coco { 20 } else { 5 };
                assert_eq!(got.novel.len(), per_fold);
            }
        }
    }

    #[test]
    fn config_selects_the_fold() {
        let config = Config {
            use_coco: true,
            use_split_coco: true,
            split: 2,
            ..Config::default()
        };
        assert_eq!(FoldClasses::of(&config).novel[..3], [3, 7, 11]);
    }
}
