//! Whole-pipeline data tests on datasets the tests generate: lists → index → episodes → batches.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use svf::config::Config;
use svf::data::index::MIN_CLASS_PIXELS;
use svf::data::raster::read_label;
use svf::data::synth::{write_dataset, SynthOptions};
use svf::data::{DataError, EpisodeLoader, EpisodeSampler, FewShotDataset, FoldClasses, Split};
use tch::{Kind, Tensor};

/// A fresh folder under cargo's per-test-target temporary directory.
fn scratch(name: &str) -> PathBuf {
    static COUNTER: AtomicUsize = AtomicUsize::new(0);
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!(
        "data-{name}-{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::SeqCst)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A small synthetic dataset and a config using it with small episode images.
fn synthetic(name: &str, train_images: usize, val_images: usize) -> Config {
    let root = scratch(name);
    let options = SynthOptions {
        train_images,
        val_images,
        size: 112,
        seed: 7,
    };
    let (train_list, val_list) = write_dataset(&root, &options).unwrap();
    Config {
        data_root: root.clone(),
        train_list,
        val_list,
        save_path: root.join("run"),
        train_h: 65,
        train_w: 57,
        val_size: 81,
        ..Config::default()
    }
}

fn values(t: &Tensor) -> HashSet<i64> {
    Vec::<i64>::try_from(t.flatten(0, -1))
        .unwrap()
        .into_iter()
        .collect()
}

#[test]
fn batches_have_the_contract_shapes_and_values() {
    let config = Config {
        shot: 2,
        ..synthetic("contract", 100, 60)
    };
    let fold = FoldClasses::of(&config);
    for split in [Split::Train, Split::Val] {
        let dataset = Arc::new(FewShotDataset::open(&config, split).unwrap());
        let expected_classes = if split == Split::Train {
            &fold.train
        } else {
            &fold.novel
        };
        assert_eq!(dataset.classes(), expected_classes.as_slice());
        assert_eq!(dataset.episodes_per_epoch(), dataset.query_count());
        let (h, w) = dataset.output_size();
        let batches: Vec<_> = EpisodeLoader::new(dataset.clone(), 3, 10..17, 3, 2)
            .collect::<Result<_, _>>()
            .unwrap();
        let sizes: Vec<usize> = batches.iter().map(|b| b.class_ids.len()).collect();
        assert_eq!(sizes, vec![3, 3, 1]);
        let indices: Vec<u64> = batches
            .iter()
            .flat_map(|b| b.episode_indices.clone())
            .collect();
        assert_eq!(indices, (10..17).collect::<Vec<_>>());
        let b = &batches[0];
        let (h, w) = (h as i64, w as i64);
        assert_eq!(b.query_image.size(), vec![3, 3, h, w]);
        assert_eq!(b.query_image.kind(), Kind::Float);
        assert_eq!(b.query_label.size(), vec![3, h, w]);
        assert_eq!(b.query_label.kind(), Kind::Int64);
        assert_eq!(b.support_images.size(), vec![3, 2, 3, h, w]);
        assert_eq!(b.support_labels.size(), vec![3, 2, h, w]);
        assert_eq!(
            b.support_paths.iter().map(Vec::len).collect::<Vec<_>>(),
            vec![2, 2, 2]
        );
        for batch in &batches {
            assert!(values(&batch.query_label).is_subset(&HashSet::from([0, 1, 255])));
            assert!(values(&batch.support_labels).is_subset(&HashSet::from([0, 1, 255])));
            assert!(batch.class_ids.iter().all(|c| expected_classes.contains(c)));
            // Normalised images: roughly zero-centred, nothing left on the 0..255 scale.
            assert!(batch.query_image.abs().max().double_value(&[]) < 3.0);
        }
        match split {
            Split::Train => assert!(b.original_labels.is_empty()),
            Split::Val => {
                assert_eq!(b.original_labels.len(), 3);
                for (label, path) in b.original_labels.iter().zip(&b.query_paths) {
                    let label_path = config
                        .data_root
                        .join("SegmentationClassAug")
                        .join(path.file_stem().unwrap())
                        .with_extension("png");
                    let raw = read_label(&label_path).unwrap();
                    assert_eq!(label.size(), vec![raw.height as i64, raw.width as i64]);
                    assert!(values(label).is_subset(&HashSet::from([0, 1, 255])));
                }
            }
        }
    }
}

#[test]
fn episodes_do_not_depend_on_the_number_of_workers() {
    let config = synthetic("workers", 60, 80);
    for split in [Split::Train, Split::Val] {
        let dataset = Arc::new(FewShotDataset::open(&config, split).unwrap());
        let run = |workers| -> Vec<_> {
            EpisodeLoader::new(dataset.clone(), 321, 0..12, 2, workers)
                .collect::<Result<Vec<_>, _>>()
                .unwrap()
        };
        let (one, four) = (run(1), run(4));
        assert_eq!(one.len(), four.len());
        for (a, b) in one.iter().zip(&four) {
            assert_eq!(a.episode_indices, b.episode_indices);
            assert_eq!(a.query_paths, b.query_paths);
            assert_eq!(a.support_paths, b.support_paths);
            assert_eq!(a.class_ids, b.class_ids);
            assert!(a.query_image.equal(&b.query_image));
            assert!(a.query_label.equal(&b.query_label));
            assert!(a.support_images.equal(&b.support_images));
            assert!(a.support_labels.equal(&b.support_labels));
        }
        // Another seed gives other episodes (validation keeps its query order, not its supports).
        let other: Vec<_> = EpisodeLoader::new(dataset.clone(), 322, 0..12, 2, 2)
            .collect::<Result<Vec<_>, _>>()
            .unwrap();
        assert!(other
            .iter()
            .zip(&one)
            .any(|(a, b)| a.support_paths != b.support_paths));
    }
}

#[test]
fn sampled_episodes_follow_the_reference_rules() {
    let config = Config {
        shot: 3,
        ..synthetic("rules", 100, 80)
    };
    let fold = FoldClasses::of(&config);
    let mut labels: HashMap<PathBuf, [u32; 256]> = HashMap::new();
    let mut histogram = |label: &Path| -> [u32; 256] {
        *labels
            .entry(label.to_path_buf())
            .or_insert_with(|| read_label(label).unwrap().histogram())
    };
    for split in [Split::Train, Split::Val] {
        let dataset = FewShotDataset::open(&config, split).unwrap();
        let allowed = if split == Split::Train {
            &fold.train
        } else {
            &fold.novel
        };
        let mut sampler = EpisodeSampler::new(&dataset, 11);
        let mut seen_classes = HashSet::new();
        let n = dataset.query_count() as u64;
        let mut first_pass = HashSet::new();
        for index in 0..3 * n {
            let draw = sampler.draw(index, 0);
            seen_classes.insert(draw.class_id);
            assert!(
                allowed.contains(&draw.class_id),
                "{split:?} episode uses class {}",
                draw.class_id
            );
            assert_eq!(draw.supports.len(), 3);
            assert!(
                !draw.supports.contains(&draw.query),
                "a support is the query"
            );
            assert_eq!(
                draw.supports.iter().collect::<HashSet<_>>().len(),
                3,
                "supports repeat"
            );
            assert!(histogram(dataset.item_paths(draw.query).1)[draw.class_id] > 0);
            for &s in &draw.supports {
                assert!(histogram(dataset.item_paths(s).1)[draw.class_id] >= MIN_CLASS_PIXELS);
            }
            if index < n {
                first_pass.insert(draw.query);
            }
            // Validation walks the list in order; training visits every image once per pass.
            if split == Split::Val {
                assert_eq!(draw.query as u64, index % n);
            }
        }
        assert_eq!(first_pass.len() as u64, n);
        assert_eq!(seen_classes.len(), allowed.len());
    }
}

#[test]
fn a_class_without_enough_images_fails_naming_it() {
    let config = Config {
        shot: 12,
        ..synthetic("few", 40, 40)
    };
    let err = FewShotDataset::open(&config, Split::Val).unwrap_err();
    let message = err.to_string();
    assert!(
        matches!(err, DataError::TooFewImages { needed: 13, .. }),
        "{message}"
    );
    assert!(message.contains("class "), "{message}");
    assert!(message.contains("shot"), "{message}");
}
