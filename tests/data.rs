//! Whole-pipeline data tests on datasets the tests generate: lists → index → episodes → batches.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

mod common;

use common::scratch;
use svf::config::Config;
use svf::data::index::MIN_CLASS_PIXELS;
use svf::data::raster::{read_label, LabelMap};
use svf::data::synth::{write_dataset, SynthOptions};
use svf::data::{DataError, EpisodeLoader, EpisodeSampler, FewShotDataset, FoldClasses, Split};
use tch::{Kind, Tensor};

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
        // Dropping a loader mid-range stops its workers (this would hang otherwise).
        let mut early = EpisodeLoader::new(dataset.clone(), 321, 0..10_000, 2, 3);
        assert!(early.next().unwrap().is_ok());
        drop(early);
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

/// Loaders dropped at every point of their range (before the first batch, mid-range, after the
/// window filled) must stop their workers: a worker that misses the stop wake-up blocks `drop`'s
/// `join()` for ever. Many rounds on a watchdog thread, failing on a timeout instead of hanging.
#[test]
fn loaders_dropped_early_never_hang() {
    let config = synthetic("drop-stress", 40, 20);
    let dataset = Arc::new(FewShotDataset::open(&config, Split::Train).unwrap());
    let (done, finished) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for round in 0..300u64 {
            let workers = 1 + (round % 6) as usize;
            let mut loader = EpisodeLoader::new(dataset.clone(), round, 0..1_000, 1, workers);
            for _ in 0..(round % 4) {
                assert!(loader.next().unwrap().is_ok());
            }
            if round % 5 == 0 {
                // Let the workers fill the window and wait on it.
                std::thread::sleep(std::time::Duration::from_millis(2));
            }
            drop(loader);
        }
        done.send(()).unwrap();
    });
    finished
        .recv_timeout(std::time::Duration::from_secs(240))
        .expect("a dropped loader did not stop its workers within 240 s (lost wake-up)");
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

/// Writes a grey JPEG and `label` as `<name>.jpg` / `<name>.png` under `root`; returns the list line.
fn write_pair(root: &Path, name: &str, label: &LabelMap) -> String {
    let (w, h) = (label.width as u32, label.height as u32);
    std::fs::create_dir_all(root.join("JPEGImages")).unwrap();
    std::fs::create_dir_all(root.join("SegmentationClassAug")).unwrap();
    image::RgbImage::from_pixel(w, h, image::Rgb([120, 130, 140]))
        .save(root.join(format!("JPEGImages/{name}.jpg")))
        .unwrap();
    image::GrayImage::from_raw(w, h, label.data.clone())
        .unwrap()
        .save(root.join(format!("SegmentationClassAug/{name}.png")))
        .unwrap();
    format!("JPEGImages/{name}.jpg SegmentationClassAug/{name}.png\n")
}

/// A 64×64 label with `class` on its first `pixels` pixels (row-major), background elsewhere.
fn label_with(pixels: &[(u8, usize)]) -> LabelMap {
    let mut label = LabelMap::filled(64, 64, 0);
    let mut at = 0;
    for &(class, n) in pixels {
        label.data[at..at + n].fill(class);
        at += n;
    }
    label
}

/// PASCAL fold 0's novel classes 1..5 with two 2048-pixel images each, plus `edge`: class 1 on
/// 2047 pixels and class 2 on 2048.
fn boundary_dataset(name: &str) -> Config {
    let root = scratch(name);
    let mut list = String::new();
    for class in 1..=5u8 {
        for copy in 0..2 {
            list += &write_pair(
                &root,
                &format!("c{class}_{copy}"),
                &label_with(&[(class, 2048)]),
            );
        }
    }
    list += &write_pair(&root, "edge", &label_with(&[(1, 2047), (2, 2048)]));
    let list_path = root.join("val.txt");
    std::fs::write(&list_path, list).unwrap();
    Config {
        data_root: root.clone(),
        train_list: list_path.clone(),
        val_list: list_path,
        save_path: root.join("run"),
        val_size: 33,
        ..Config::default()
    }
}

#[test]
fn the_2048_pixel_rule_is_exact_at_its_boundary() {
    let config = boundary_dataset("boundary");
    let dataset = FewShotDataset::open(&config, Split::Val).unwrap();
    // `edge` is a query (class 2 is eligible) but supports only class 2.
    assert_eq!(dataset.query_count(), 11);
    assert_eq!(dataset.support_count(1), 2);
    assert_eq!(dataset.support_count(2), 3);
    assert_eq!(dataset.support_count(3), 2);
    // Its small class 1 can still be the episode's class, as in the reference.
    let edge = (0..11)
        .find(|&i| dataset.item_paths(i).0.ends_with("JPEGImages/edge.jpg"))
        .unwrap();
    let mut sampler = EpisodeSampler::new(&dataset, 3);
    let classes: HashSet<usize> = (0..200u64)
        .map(|k| sampler.draw(edge as u64 + 11 * k, 0))
        .inspect(|d| assert_eq!(d.query, edge))
        .map(|d| d.class_id)
        .collect();
    assert_eq!(classes, HashSet::from([1, 2]));
}

#[test]
fn the_class_index_cache_is_reused_and_follows_file_changes() {
    let config = boundary_dataset("cache");
    FewShotDataset::open(&config, Split::Val).unwrap();
    let cache_dir = config.data_root.join(".svf-index");
    let cache = std::fs::read_dir(&cache_dir)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    // Reuse: a doctored record (same file stamps) is believed.
    let text = std::fs::read_to_string(&cache).unwrap();
    let doctored = text.replace("[[1,2047],[2,2048]]", "[[1,5000],[2,2048]]");
    assert_ne!(text, doctored, "cache format changed: {text}");
    std::fs::write(&cache, doctored).unwrap();
    let dataset = FewShotDataset::open(&config, Split::Val).unwrap();
    assert_eq!(dataset.support_count(1), 3);
    // Invalidation: a rewritten label (new modification time) is read again.
    let label = config.data_root.join("SegmentationClassAug/edge.png");
    write_pair(
        &config.data_root,
        "edge",
        &label_with(&[(1, 2000), (2, 10)]),
    );
    let later = std::time::SystemTime::now() + std::time::Duration::from_secs(5);
    std::fs::File::options()
        .write(true)
        .open(&label)
        .unwrap()
        .set_modified(later)
        .unwrap();
    let dataset = FewShotDataset::open(&config, Split::Val).unwrap();
    // Both classes now fall below 2048 pixels in `edge`: the doctored 5000 is forgotten too.
    assert_eq!(dataset.support_count(1), 2);
    assert_eq!(dataset.support_count(2), 2);
}

/// Cuts a file to half its length.
fn truncate(path: &Path) {
    let bytes = std::fs::read(path).unwrap();
    std::fs::write(path, &bytes[..bytes.len() / 2]).unwrap();
}

#[test]
fn a_bad_file_mid_run_is_replaced_and_too_many_abort() {
    let config = Config {
        train_h: 33,
        train_w: 33,
        ..synthetic("bad", 60, 40)
    };
    let dataset = Arc::new(FewShotDataset::open(&config, Split::Train).unwrap());
    // Break one image after the index was built, and find a window of 20 episodes where exactly
    // one episode reads it.
    let bad = 0;
    let bad_path = dataset.item_paths(bad).0.to_path_buf();
    truncate(&bad_path);
    let mut sampler = EpisodeSampler::new(&dataset, 5);
    let hits: Vec<bool> = (0..2000u64)
        .map(|i| {
            let d = sampler.draw(i, 0);
            d.query == bad || d.supports.contains(&bad)
        })
        .collect();
    let start = (0..hits.len() - 20)
        .find(|&s| hits[s..s + 20].iter().filter(|&&h| h).count() == 1)
        .unwrap();
    let hit = (start..start + 20).find(|&i| hits[i]).unwrap() as u64;
    let mut loader = EpisodeLoader::new(dataset.clone(), 5, start as u64..start as u64 + 20, 4, 2);
    let batches: Vec<_> = loader.by_ref().collect::<Result<_, _>>().unwrap();
    assert_eq!(loader.failed_episodes(), 1);
    let replaced = batches
        .iter()
        .flat_map(|b| b.episode_indices.iter().zip(&b.query_paths))
        .find(|(&i, _)| i == hit)
        .unwrap();
    // The replacement takes the next position's query and its own stream.
    let replacement = sampler.draw(hit, 1);
    assert_eq!(replaced.1, dataset.item_paths(replacement.query).0);
    assert!(batches.iter().all(|b| !b.query_paths.contains(&bad_path)));

    // Break a third of the images: the run stops with a message naming a file.
    for item in (0..dataset.query_count()).step_by(3) {
        truncate(dataset.item_paths(item).0);
    }
    let result: Result<Vec<_>, _> = EpisodeLoader::new(dataset.clone(), 5, 0..400, 4, 2).collect();
    let message = result.unwrap_err().to_string();
    assert!(message.contains("more than 1%"), "{message}");
    assert!(message.contains(".jpg"), "{message}");
}

/// Runs `svf-data check` on `config` (written as YAML) and returns (success, stderr).
fn run_check(config: &Config) -> (bool, String) {
    std::fs::create_dir_all(&config.save_path).unwrap();
    let path = config.save_path.join("check.yaml");
    std::fs::write(&path, config.to_yaml()).unwrap();
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_svf-data"))
        .args(["check", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[test]
fn check_reports_each_planted_defect_by_file() {
    let config = synthetic("check", 40, 40);
    let (ok, stderr) = run_check(&config);
    assert!(ok, "clean dataset rejected: {stderr}");
    let root = &config.data_root;
    std::fs::remove_file(root.join("JPEGImages/train_00001.jpg")).unwrap();
    truncate(&root.join("JPEGImages/train_00002.jpg"));
    image::GrayImage::new(10, 12)
        .save(root.join("SegmentationClassAug/train_00003.png"))
        .unwrap();
    let mut label = read_label(&root.join("SegmentationClassAug/val_00004.png")).unwrap();
    label.data[5] = 42;
    image::GrayImage::from_raw(label.width as u32, label.height as u32, label.data)
        .unwrap()
        .save(root.join("SegmentationClassAug/val_00004.png"))
        .unwrap();
    let (ok, stderr) = run_check(&config);
    assert!(!ok);
    let line = |needle: &str| {
        stderr
            .lines()
            .find(|l| l.contains(needle))
            .unwrap_or_else(|| panic!("no line names {needle}:\n{stderr}"))
            .to_string()
    };
    assert!(line("train_00001.jpg").contains("missing"));
    assert!(line("train_00002.jpg").contains("truncated"));
    assert!(line("train_00003.png").contains("size mismatch"));
    assert!(line("train_00003.png").contains("is 10x12 (width x height)"));
    assert!(line("val_00004.png").contains("[42]"));
}

#[test]
fn a_label_of_another_size_is_named_width_x_height_when_indexed() {
    let config = synthetic("size-mismatch", 40, 40);
    let label = config
        .data_root
        .join("SegmentationClassAug/train_00000.png");
    let image =
        image::image_dimensions(config.data_root.join("JPEGImages/train_00000.jpg")).unwrap();
    image::GrayImage::new(60, 50).save(&label).unwrap();
    let message = FewShotDataset::open(&config, Split::Train)
        .unwrap_err()
        .to_string();
    assert!(
        message.contains(&format!(
            "is {}x{} but its label {} is 60x50 (width x height)",
            image.0,
            image.1,
            label.display()
        )),
        "{message}"
    );
}

#[test]
fn check_names_every_malformed_line_and_still_checks_the_rest() {
    let config = synthetic("malformed", 100, 40);
    let text = std::fs::read_to_string(&config.train_list).unwrap();
    let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
    lines[2] = lines[2].split(' ').next().unwrap().to_string();
    lines[6] += " extra";
    std::fs::write(&config.train_list, lines.join("\n")).unwrap();
    std::fs::remove_file(config.data_root.join("JPEGImages/train_00010.jpg")).unwrap();
    let (ok, stderr) = run_check(&config);
    assert!(!ok);
    let list = config.train_list.display();
    for (line, fields) in [(3, 1), (7, 3)] {
        assert!(
            stderr.contains(&format!("{list}, line {line}: expected `IMAGE LABEL`"))
                && stderr.contains(&format!("found {fields} field(s)")),
            "{stderr}"
        );
    }
    assert!(
        stderr.contains("missing image file") && stderr.contains("train_00010.jpg"),
        "{stderr}"
    );
    assert!(stderr.contains("3 problem(s)"), "{stderr}");
    // Training refuses the list at its first malformed line.
    let message = FewShotDataset::open(&config, Split::Train)
        .unwrap_err()
        .to_string();
    assert!(message.contains(&format!("{list}, line 3:")), "{message}");
}

#[test]
fn a_list_of_another_machines_absolute_paths_is_one_error_saying_what_to_strip() {
    let mut config = synthetic("foreign", 40, 40);
    let foreign = "/nonexistent-machine/home/them/VOC2012";
    let text = std::fs::read_to_string(&config.train_list).unwrap();
    let list = config.data_root.join("lists/foreign.txt");
    let absolute: String = text
        .lines()
        .map(|line| line.replace("JPEGImages", &format!("{foreign}/JPEGImages")))
        .map(|line| line.replace(" Seg", &format!(" {foreign}/Seg")) + "\n")
        .collect();
    std::fs::write(&list, absolute).unwrap();
    config.train_list = list.clone();
    let (ok, stderr) = run_check(&config);
    assert!(!ok);
    assert_eq!(stderr.matches(foreign).count(), 2, "{stderr}");
    assert_eq!(
        stderr.matches("holds absolute paths").count(),
        1,
        "{stderr}"
    );
    let strip = format!("`sed -i 's|{foreign}/||g' {}`", list.display());
    assert!(stderr.contains(&strip), "{stderr}");
    assert!(stderr.contains("1 problem(s)"), "{stderr}");
    let message = FewShotDataset::open(&config, Split::Train)
        .unwrap_err()
        .to_string();
    assert!(message.contains(&strip), "{message}");
}

/// Classes (1..=254) and their pixel counts in a label PNG, read with the `image` crate directly
/// (not through the project's reader).
fn png_classes(path: &Path) -> HashMap<usize, usize> {
    let mut pixels = HashMap::new();
    for &v in image::open(path).unwrap().to_luma8().as_raw() {
        if v != 0 && v != 255 {
            *pixels.entry(v as usize).or_insert(0) += 1;
        }
    }
    pixels
}

/// Image paths of a dataset's query list.
fn queries(dataset: &FewShotDataset) -> Vec<PathBuf> {
    (0..dataset.query_count())
        .map(|i| dataset.item_paths(i).0.to_path_buf())
        .collect()
}

#[test]
fn bam_filter_drops_exactly_the_images_showing_a_novel_class() {
    use svf::config::TrainFilter;
    let config = synthetic("bam-filter", 160, 40);
    let fold = FoldClasses::of(&config);
    // The rule, counted from the PNGs: PFENet keeps an image with a training class of >= 2048
    // pixels; BAM also requires every class present to be a training class.
    let (mut pfenet, mut bam) = (Vec::new(), Vec::new());
    for line in std::fs::read_to_string(&config.train_list).unwrap().lines() {
        let (image, label) = line.split_once(' ').unwrap();
        let classes = png_classes(&config.data_root.join(label));
        let eligible = classes
            .iter()
            .any(|(c, &n)| fold.train.contains(c) && n >= MIN_CLASS_PIXELS as usize);
        if eligible {
            pfenet.push(config.data_root.join(image));
            if classes.keys().all(|c| fold.train.contains(c)) {
                bam.push(config.data_root.join(image));
            }
        }
    }
    // Planted novel objects: some images PFENet keeps show a novel class.
    assert!(
        bam.len() + 10 < pfenet.len(),
        "{} vs {}",
        bam.len(),
        pfenet.len()
    );
    let open = |filter| {
        let config = Config {
            train_filter: filter,
            ..config.clone()
        };
        FewShotDataset::open(&config, Split::Train).unwrap()
    };
    // PFENet, BAM, PFENet again on the same index cache: the rule is never cached.
    assert_eq!(queries(&open(TrainFilter::Pfenet)), pfenet);
    let filtered = open(TrainFilter::Bam);
    assert_eq!(queries(&filtered), bam);
    assert_eq!(queries(&open(TrainFilter::Pfenet)), pfenet);
    // Validation keeps PFENet's rule under both.
    let val = |filter| {
        let config = Config {
            train_filter: filter,
            ..config.clone()
        };
        queries(&FewShotDataset::open(&config, Split::Val).unwrap())
    };
    assert_eq!(val(TrainFilter::Bam), val(TrainFilter::Pfenet));

    // Exported in BAM's formats, the lists read back to the same episodes.
    let config = Config {
        train_filter: TrainFilter::Bam,
        ..config
    };
    let out = config.data_root.join("fss_list");
    let written = svf::data::write_bam_fold_lists(&config, &out).unwrap();
    assert_eq!(written.len(), 8);
    assert_eq!(written[0].images, bam.len());
    let data_list = out.join("train/data_list_0.txt");
    let sub_class_list = out.join("train/sub_class_file_list_0.txt");
    assert_eq!(written[0].data_list, data_list);
    let reread = |list: &Path| {
        let config = Config {
            train_list: list.to_path_buf(),
            // The list itself carries BAM's filter.
            train_filter: TrainFilter::Pfenet,
            ..config.clone()
        };
        FewShotDataset::open(&config, Split::Train).unwrap()
    };
    let from_data_list = reread(&data_list);
    let draws = |dataset: &FewShotDataset| -> Vec<(PathBuf, usize, Vec<PathBuf>)> {
        let mut sampler = EpisodeSampler::new(dataset, 5);
        (0..3 * dataset.query_count() as u64)
            .map(|i| {
                let d = sampler.draw(i, 0);
                let path = |item: usize| dataset.item_paths(item).0.to_path_buf();
                (
                    path(d.query),
                    d.class_id,
                    d.supports.iter().map(|&s| path(s)).collect(),
                )
            })
            .collect()
    };
    assert_eq!(draws(&from_data_list), draws(&filtered));
    // The dict lists the same images and, per class, the same supports (in its own order).
    let from_sub_class = reread(&sub_class_list);
    let sorted = |mut v: Vec<PathBuf>| {
        v.sort();
        v
    };
    assert_eq!(sorted(queries(&from_sub_class)), sorted(bam.clone()));
    for &class in &fold.train {
        assert_eq!(
            from_sub_class.support_count(class),
            filtered.support_count(class)
        );
    }
    // Another fold's dict is refused, naming the class and its line.
    let message = FewShotDataset::open(
        &Config {
            train_list: sub_class_list.clone(),
            split: 1,
            ..config.clone()
        },
        Split::Train,
    )
    .unwrap_err()
    .to_string();
    assert!(
        message.contains(&format!("{}, line 1", sub_class_list.display()))
            && message.contains("class 6 is not a training class of fold 1"),
        "{message}"
    );
    assert!(
        message.contains("holds the training classes of fold 0")
            && message.contains("or set `split: 0`"),
        "{message}"
    );
    let text = std::fs::read_to_string(&sub_class_list).unwrap();
    assert!(text.starts_with("{6: [('JPEGImages/"), "{}", &text[..60]);
    // `svf-data check` says it too, instead of one "0 eligible images" line per class.
    let (ok, stderr) = run_check(&Config {
        train_list: sub_class_list.clone(),
        split: 1,
        save_path: config.save_path.join("check-fold1"),
        ..config.clone()
    });
    assert!(!ok);
    assert!(
        stderr.contains("class 6 is not a training class of fold 1")
            && stderr.contains("holds the training classes of fold 0"),
        "{stderr}"
    );
    let too_few = format!("in {}, but train episodes", sub_class_list.display());
    assert!(!stderr.contains(&too_few), "{stderr}");

    // A claim the labels contradict: one error naming the file and line.
    let (image, label) = std::fs::read_to_string(&config.train_list)
        .unwrap()
        .lines()
        .map(|l| {
            l.split_once(' ')
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .unwrap()
        })
        .find(|(_, label)| !png_classes(&config.data_root.join(label)).contains_key(&7))
        .unwrap();
    let bad = out.join("bad_sub_class.txt");
    std::fs::write(&bad, format!("{{7: [\n('{image}', '{label}')]}}")).unwrap();
    let err = FewShotDataset::open(
        &Config {
            train_list: bad.clone(),
            ..config.clone()
        },
        Split::Train,
    )
    .unwrap_err();
    let message = err.to_string();
    assert!(
        message.contains(&format!("{}, line 2", bad.display())) && message.contains("class 7"),
        "{message}"
    );
    // `svf-data check` refutes it too, with training's message.
    let (ok, stderr) = run_check(&Config {
        train_list: bad.clone(),
        save_path: config.save_path.join("check-claims"),
        ..config.clone()
    });
    assert!(!ok);
    assert!(stderr.contains(&message), "{message} not in {stderr}");
    // A list that does not exist names the path and the key.
    let missing = Config {
        train_list: out.join("nowhere.txt"),
        ..config
    };
    let message = FewShotDataset::open(&missing, Split::Train)
        .unwrap_err()
        .to_string();
    assert!(
        message.contains("nowhere.txt") && message.contains("train_list"),
        "{message}"
    );
}

#[test]
fn synth_refuses_lists_without_two_images_of_each_class() {
    let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join("synth-too-few");
    for args in [&["--images", "39"][..], &["--val-images", "0"][..]] {
        let output = std::process::Command::new(env!("CARGO_BIN_EXE_svf-data"))
            .args(["synth", "--out"])
            .arg(&out)
            .args(args)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{args:?} accepted");
        assert!(stderr.contains("is not in 40.."), "{args:?}: {stderr}");
    }
    assert!(!out.exists(), "a refused synth wrote {}", out.display());
}

#[test]
fn a_data_root_that_is_no_folder_is_one_error_naming_the_key() {
    let mut config = synthetic("no-data-root", 40, 40);
    let missing = config.data_root.join("missing");
    config.data_root = missing.clone();
    let Err(error) = FewShotDataset::open(&config, Split::Train) else {
        panic!("a missing data_root was accepted");
    };
    let message = error.to_string();
    assert!(
        message.contains(&format!("data_root {}", missing.display())),
        "{message}"
    );
    assert!(message.contains("--set data_root=DIR"), "{message}");
    // `svf-data check` says it once per list, not once per image.
    let (ok, stderr) = run_check(&config);
    assert!(!ok);
    assert_eq!(stderr.matches("is not a folder").count(), 2, "{stderr}");
    assert!(stderr.contains("2 problem(s)"), "{stderr}");
}
