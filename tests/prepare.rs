//! `svf-data prepare` on small downloads the tests build: SBD MAT-files written by scipy (compressed
//! and not), VOC palette PNGs, COCO annotation files with polygons, crowd RLEs (uncompressed and
//! compressed) and overlapping objects. Labels are compared pixel for pixel with what the tests
//! drew, and COCO's with pycocotools' `annToMask`; the result must pass `svf-data check`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::SystemTime;

mod common;

use common::{python_with, run_ok, scratch};
use serde_json::json;
use svf::config::Config;
use svf::data::check::check_dataset;
use svf::data::prepare::coco::{prepare_coco, CocoOptions, CrowdLabel};
use svf::data::prepare::pascal::{prepare_pascal, PascalOptions, TRAIN_LIST, VAL_LIST};
use svf::data::prepare::{ImageMode, PrepareError, PrepareSummary, LOCK_FILE};
use svf::data::raster::{read_label, LabelMap};
use svf::data::rng::EpisodeRng;

fn write_jpeg(path: &Path, height: usize, width: usize, seed: u64) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let mut rng = EpisodeRng::new(seed, 0, 0);
    let pixels: Vec<u8> = (0..height * width * 3)
        .map(|_| rng.below(256) as u8)
        .collect();
    image::RgbImage::from_raw(width as u32, height as u32, pixels)
        .unwrap()
        .save(path)
        .unwrap();
}

/// VOC's colour map (bit-interleaved class index), so fixtures look like VOC's files.
fn voc_palette() -> Vec<u8> {
    let mut palette = Vec::new();
    for i in 0..256usize {
        let (mut r, mut g, mut b, mut c) = (0u8, 0u8, 0u8, i);
        for j in 0..8 {
            r |= ((c & 1) as u8) << (7 - j);
            g |= (((c >> 1) & 1) as u8) << (7 - j);
            b |= (((c >> 2) & 1) as u8) << (7 - j);
            c >>= 3;
        }
        palette.extend([r, g, b]);
    }
    palette
}

fn write_palette_png(path: &Path, label: &LabelMap) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let file = std::fs::File::create(path).unwrap();
    let mut encoder = png::Encoder::new(file, label.width as u32, label.height as u32);
    encoder.set_color(png::ColorType::Indexed);
    encoder.set_depth(png::BitDepth::Eight);
    encoder.set_palette(voc_palette());
    let mut writer = encoder.write_header().unwrap();
    writer.write_image_data(&label.data).unwrap();
}

/// A label with one big rectangle of `class` (2640 pixels, at least 2400 after outline and
/// square: eligible), a small square of
/// `other`, and, for VOC-style labels, a 255 outline around the rectangle.
fn drawn_label(class: u8, other: u8, outline: bool, seed: u64) -> LabelMap {
    let (height, width) = (48, 64);
    let mut label = LabelMap::filled(height, width, 0);
    let mut rng = EpisodeRng::new(seed, 1, 0);
    for y in 2..46 {
        for x in 2..62 {
            let edge = y == 2 || y == 45 || x == 2 || x == 61;
            label.data[y * width + x] = if outline && edge { 255 } else { class };
        }
    }
    let (y0, x0) = (rng.below(40), rng.below(56));
    for y in y0..y0 + 6 {
        for x in x0..x0 + 6 {
            label.data[y * width + x] = other;
        }
    }
    label
}

/// A PASCAL download with known labels.
struct PascalFixture {
    voc: PathBuf,
    sbd: PathBuf,
    /// The label each listed id must get.
    expected: HashMap<String, LabelMap>,
    train: Vec<String>,
    val: Vec<String>,
}

/// SBD ids sbd_00..29 (classes 6..20 twice: fold 0's training classes), of which 00..09 are also
/// in VOC train with a different (VOC) label that must win; VOC train adds voc_0, voc_1; VOC val
/// is val_0..9 (classes 1..5 twice), and val_0 is also in the SBD list (it must not be trained
/// on). Bad ids: a MAT-file without GTcls, a truncated MAT-file, an id without label, an id
/// without image, a VOC label with a value that is no class, a label of another size than its
/// image.
fn pascal_fixture(root: &Path, python: &Path) -> PascalFixture {
    let voc = root.join("VOCdevkit/VOC2012");
    let sbd = root.join("benchmark_RELEASE/dataset");
    let mut expected = HashMap::new();
    let mut mats = Vec::new();
    let mut mat = |id: &str, label: &LabelMap, compressed: bool, variable: &str| {
        mats.push(json!({
            "path": sbd.join("cls").join(format!("{id}.mat")),
            "variable": variable,
            "compressed": compressed,
            "height": label.height,
            "width": label.width,
            "data": label.data,
        }));
    };
    let mut sbd_ids: Vec<String> = Vec::new();
    for n in 0..30u64 {
        let id = format!("sbd_{n:02}");
        let class = 6 + (n % 15) as u8;
        let sbd_label = drawn_label(class, 1 + (n % 20) as u8, false, n);
        mat(&id, &sbd_label, n % 2 == 0, "GTcls");
        write_jpeg(&voc.join("JPEGImages").join(format!("{id}.jpg")), 48, 64, n);
        if n < 10 {
            let voc_label = drawn_label(class, 0, true, 100 + n);
            write_palette_png(
                &voc.join("SegmentationClass").join(format!("{id}.png")),
                &voc_label,
            );
            expected.insert(id.clone(), voc_label);
        } else {
            expected.insert(id.clone(), sbd_label);
        }
        sbd_ids.push(id);
    }
    let mut voc_train: Vec<String> = (0..10).rev().map(|n| format!("sbd_{n:02}")).collect();
    for n in 0..2u64 {
        let id = format!("voc_{n}");
        let label = drawn_label(7 + n as u8, 0, true, 200 + n);
        write_palette_png(
            &voc.join("SegmentationClass").join(format!("{id}.png")),
            &label,
        );
        write_jpeg(
            &voc.join("JPEGImages").join(format!("{id}.jpg")),
            48,
            64,
            200 + n,
        );
        expected.insert(id.clone(), label);
        voc_train.push(id);
    }
    let mut val = Vec::new();
    for n in 0..10u64 {
        let id = format!("val_{n}");
        let label = drawn_label(1 + (n % 5) as u8, 0, true, 300 + n);
        write_palette_png(
            &voc.join("SegmentationClass").join(format!("{id}.png")),
            &label,
        );
        write_jpeg(
            &voc.join("JPEGImages").join(format!("{id}.jpg")),
            48,
            64,
            300 + n,
        );
        expected.insert(id.clone(), label);
        val.push(id);
    }
    // Bad ids, all in the SBD list.
    let filler = drawn_label(6, 0, false, 400);
    mat("bad_nogtcls", &filler, true, "GTinst");
    mat("bad_truncated", &filler, true, "GTcls");
    for id in ["bad_nogtcls", "bad_truncated", "bad_nolabel", "bad_noimage"] {
        if id != "bad_noimage" {
            write_jpeg(
                &voc.join("JPEGImages").join(format!("{id}.jpg")),
                48,
                64,
                400,
            );
        }
        sbd_ids.push(id.to_string());
    }
    mat("bad_noimage", &filler, false, "GTcls");
    let mut out_of_range = drawn_label(9, 0, true, 401);
    out_of_range.data[100] = 30;
    write_palette_png(&voc.join("SegmentationClass/bad_values.png"), &out_of_range);
    write_jpeg(&voc.join("JPEGImages/bad_values.jpg"), 48, 64, 401);
    mat("bad_size", &filler, false, "GTcls");
    write_jpeg(&voc.join("JPEGImages/bad_size.jpg"), 40, 64, 402);
    sbd_ids.extend(["bad_values".to_string(), "bad_size".to_string()]);
    sbd_ids.insert(3, "val_0".to_string());

    let spec = root.join("mats.json");
    std::fs::write(&spec, serde_json::to_string(&mats).unwrap()).unwrap();
    run_ok(Command::new(python).args(["-c", WRITE_MATS]).arg(&spec));
    let truncated = sbd.join("cls/bad_truncated.mat");
    let bytes = std::fs::read(&truncated).unwrap();
    std::fs::write(&truncated, &bytes[..bytes.len() - 40]).unwrap();

    let sets = voc.join("ImageSets/Segmentation");
    std::fs::create_dir_all(&sets).unwrap();
    std::fs::write(sets.join("train.txt"), voc_train.join("\n") + "\n").unwrap();
    std::fs::write(sets.join("val.txt"), val.join("\n") + "\n").unwrap();
    std::fs::write(sbd.join("train_noval.txt"), sbd_ids.join("\n") + "\n").unwrap();

    // PFENet's rule: SBD list then VOC train, repeats and val ids dropped; bad ids skipped.
    let mut train: Vec<String> = sbd_ids
        .iter()
        .filter(|id| !id.starts_with("bad_") && !id.starts_with("val_"))
        .cloned()
        .collect();
    train.extend(["voc_0".to_string(), "voc_1".to_string()]);
    PascalFixture {
        voc,
        sbd,
        expected,
        train,
        val,
    }
}

/// Writes SBD-style `cls` files with scipy: `GTcls` with the fields SBD has (Boundaries, a cell
/// of sparse matrices; Segmentation, uint8; CategoriesPresent).
const WRITE_MATS: &str = r#"
import json, sys, os
import numpy as np, scipy.io, scipy.sparse
for m in json.load(open(sys.argv[1])):
    seg = np.array(m["data"], dtype=np.uint8).reshape(m["height"], m["width"])
    boundaries = np.empty((20, 1), dtype=object)
    for i in range(20):
        boundaries[i, 0] = scipy.sparse.csc_matrix((seg == i + 1).astype(bool))
    present = np.unique(seg[(seg > 0) & (seg < 255)]).astype(np.uint8).reshape(-1, 1)
    value = {"Boundaries": boundaries, "Segmentation": seg, "CategoriesPresent": present}
    os.makedirs(os.path.dirname(m["path"]), exist_ok=True)
    scipy.io.savemat(m["path"], {m["variable"]: value}, do_compression=m["compressed"])
"#;

fn list_ids(path: &Path, folder: &str) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|line| {
            let (image, label) = line.split_once(' ').unwrap();
            let id = image
                .strip_prefix("JPEGImages/")
                .unwrap()
                .strip_suffix(".jpg")
                .unwrap();
            assert_eq!(label, format!("{folder}/{id}.png"));
            id.to_string()
        })
        .collect()
}

fn pascal_options(fixture: &PascalFixture, root: &Path, images: ImageMode) -> PascalOptions {
    PascalOptions {
        voc: fixture.voc.clone(),
        sbd: fixture.sbd.clone(),
        sbd_list: None,
        out: root.join("out"),
        lists: root.join("lists"),
        images,
        threads: 2,
    }
}

fn reasons(summary: &PrepareSummary) -> Vec<String> {
    summary
        .skipped
        .iter()
        .map(|s| format!("{}: {}", s.path.display(), s.reason))
        .collect()
}

#[test]
fn pascal_labels_lists_and_check() {
    let python = python_with(&["scipy", "numpy"]);
    let root = scratch("pascal");
    let fixture = pascal_fixture(&root, &python);
    let summary = prepare_pascal(&pascal_options(&fixture, &root, ImageMode::Link)).unwrap();
    let out = root.join("out");

    assert_eq!(
        list_ids(&root.join("lists").join(TRAIN_LIST), "SegmentationClassAug"),
        fixture.train
    );
    assert_eq!(
        list_ids(&root.join("lists").join(VAL_LIST), "SegmentationClassAug"),
        fixture.val
    );
    for id in fixture.train.iter().chain(&fixture.val) {
        let label = read_label(&out.join(format!("SegmentationClassAug/{id}.png"))).unwrap();
        assert!(label == fixture.expected[id], "label of {id} differs");
        let image = out.join(format!("JPEGImages/{id}.jpg"));
        assert!(image.symlink_metadata().unwrap().file_type().is_symlink());
        assert!(image.is_file(), "{} dangles", image.display());
    }
    let skipped = reasons(&summary);
    assert_eq!(skipped.len(), 6, "{skipped:#?}");
    for (file, reason) in [
        ("bad_nogtcls.mat", "no variable GTcls"),
        ("bad_truncated.mat", "truncated"),
        ("bad_nolabel.mat", "no label"),
        ("bad_noimage.jpg", "image file missing"),
        ("bad_values.png", "holds values [30]"),
        ("bad_size.mat", "label is 64x48 but the image"),
    ] {
        assert!(
            skipped
                .iter()
                .any(|s| s.contains(file) && s.contains(reason)),
            "no `{file}: …{reason}…` in {skipped:#?}"
        );
    }
    assert_eq!(
        summary.labels_written,
        fixture.train.len() + fixture.val.len()
    );
    for class in 1..=20 {
        let holding = fixture
            .train
            .iter()
            .filter(|id| fixture.expected[*id].data.contains(&class))
            .count();
        assert_eq!(summary.lists[0].images_per_class[class as usize], holding);
    }
    assert!(
        summary.notes[0].contains("1 VOC val id(s) removed"),
        "{summary}"
    );

    let config = Config {
        data_root: out,
        train_list: root.join("lists").join(TRAIN_LIST),
        val_list: root.join("lists").join(VAL_LIST),
        ..Config::default()
    };
    let report = check_dataset(&config);
    assert!(report.is_clean(), "{:#?}", report.problems);
}

fn modified(path: &Path) -> SystemTime {
    std::fs::metadata(path).unwrap().modified().unwrap()
}

#[test]
fn pascal_rerun_keeps_finished_files_and_writes_missing_ones() {
    let python = python_with(&["scipy", "numpy"]);
    let root = scratch("resume");
    let fixture = pascal_fixture(&root, &python);
    prepare_pascal(&pascal_options(&fixture, &root, ImageMode::Copy)).unwrap();
    let out = root.join("out");
    let label = |id: &str| out.join(format!("SegmentationClassAug/{id}.png"));
    let image = |id: &str| out.join(format!("JPEGImages/{id}.jpg"));
    assert!(image("sbd_00").symlink_metadata().unwrap().is_file());
    let before: HashMap<PathBuf, SystemTime> = fixture
        .train
        .iter()
        .flat_map(|id| [label(id), image(id)])
        .map(|p| (p.clone(), modified(&p)))
        .collect();
    // An interrupted run's leftovers: a deleted label (with the partial file a kill leaves), a
    // truncated one, a missing image.
    std::fs::remove_file(label("sbd_12")).unwrap();
    let bytes = std::fs::read(label("sbd_13")).unwrap();
    std::fs::write(label("sbd_13"), &bytes[..bytes.len() / 2]).unwrap();
    std::fs::remove_file(image("voc_1")).unwrap();
    std::fs::write(
        out.join("SegmentationClassAug/sbd_12.png.partial"),
        b"half a PNG",
    )
    .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(50));

    let output = run_ok(
        Command::new(env!("CARGO_BIN_EXE_svf-data"))
            .args(["prepare", "pascal", "--copy", "--threads", "2", "--voc"])
            .arg(&fixture.voc)
            .arg("--sbd")
            .arg(&fixture.sbd)
            .arg("--out")
            .arg(&out)
            .arg("--lists")
            .arg(root.join("lists")),
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.contains("labels: 2 written"), "{stdout}");
    assert!(stdout.contains("images: 1 placed"), "{stdout}");
    assert!(stdout.contains("6 file(s) skipped"), "{stdout}");
    let rewritten = [label("sbd_12"), label("sbd_13"), image("voc_1")];
    for (path, stamp) in &before {
        if rewritten.contains(path) {
            assert!(
                modified(path) > *stamp,
                "{} was not rewritten",
                path.display()
            );
        } else {
            assert_eq!(modified(path), *stamp, "{} was rewritten", path.display());
        }
    }
    for id in ["sbd_12", "sbd_13"] {
        assert!(read_label(&label(id)).unwrap() == fixture.expected[id]);
    }
    assert!(!std::fs::read_dir(out.join("SegmentationClassAug"))
        .unwrap()
        .any(|e| e
            .unwrap()
            .file_name()
            .to_string_lossy()
            .ends_with(".partial")));
}

#[test]
fn missing_inputs_are_errors_that_name_the_file_and_the_fix() {
    let root = scratch("missing");
    let voc = root.join("VOC2012");
    let sbd = root.join("dataset");
    let options = PascalOptions {
        voc: voc.clone(),
        sbd: sbd.clone(),
        sbd_list: None,
        out: root.join("out"),
        lists: root.join("lists"),
        images: ImageMode::Link,
        threads: 1,
    };
    let message = prepare_pascal(&options).unwrap_err().to_string();
    assert!(
        message.contains("VOC2012/JPEGImages") && message.contains("--voc"),
        "{message}"
    );
    for dir in ["JPEGImages", "SegmentationClass", "ImageSets/Segmentation"] {
        std::fs::create_dir_all(voc.join(dir)).unwrap();
    }
    std::fs::create_dir_all(sbd.join("cls")).unwrap();
    std::fs::write(voc.join("ImageSets/Segmentation/train.txt"), "a\n").unwrap();
    std::fs::write(voc.join("ImageSets/Segmentation/val.txt"), "b\n").unwrap();
    let message = prepare_pascal(&options).unwrap_err().to_string();
    assert!(
        message.contains("train_noval.txt") && message.contains("home.bharathh.info"),
        "{message}"
    );

    let coco = root.join("coco");
    for dir in ["train2014", "val2014", "annotations"] {
        std::fs::create_dir_all(coco.join(dir)).unwrap();
    }
    let text = serde_json::to_string(&coco_file(&[], &[], &category_ids())).unwrap();
    std::fs::write(coco.join("annotations/instances_train2014.json"), &text).unwrap();
    std::fs::write(
        coco.join("annotations/instances_val2014.json"),
        &text[..text.len() / 2],
    )
    .unwrap();
    let error = prepare_coco(&CocoOptions {
        coco: coco.clone(),
        out: root.join("coco_out"),
        lists: root.join("lists"),
        images: ImageMode::Link,
        crowd: CrowdLabel::Class,
        threads: 1,
    })
    .unwrap_err();
    assert!(matches!(error, PrepareError::BadInput { .. }));
    let message = error.to_string();
    assert!(
        message.contains("instances_val2014.json") && message.contains("truncated"),
        "{message}"
    );
}

/// COCO's 80 category ids (1..90 with gaps), listed out of order.
fn category_ids() -> Vec<u64> {
    let gaps = [12, 26, 29, 30, 45, 66, 68, 69, 71, 83];
    let mut ids: Vec<u64> = (1..=90).filter(|id| !gaps.contains(id)).collect();
    ids.reverse();
    ids
}

fn coco_file(
    images: &[serde_json::Value],
    annotations: &[serde_json::Value],
    categories: &[u64],
) -> serde_json::Value {
    json!({
        "info": {"description": "test"},
        "images": images,
        "annotations": annotations,
        "categories": categories.iter().map(|id| json!({"id": id, "name": format!("c{id}"), "supercategory": "x"})).collect::<Vec<_>>(),
    })
}

/// A COCO download: per split, two 48×48 images per class of the split with one big rectangle
/// (eligible), plus, in train, images with hard geometry for the pycocotools comparison and bad
/// records that must be skipped.
struct CocoFixture {
    coco: PathBuf,
    train: Vec<String>,
    val: Vec<String>,
}

fn coco_fixture(root: &Path, python: &Path) -> CocoFixture {
    let coco = root.join("coco");
    let ids = category_ids();
    let mut sorted = ids.clone();
    sorted.sort_unstable();
    let mut next_annotation = 1u64;
    let mut listed = HashMap::new();
    for (split, classes) in [
        ("train2014", (1..=80).collect::<Vec<usize>>()),
        ("val2014", (0..20).map(|i| 1 + 4 * i).collect()),
    ] {
        let mut images = Vec::new();
        let mut annotations = Vec::new();
        let mut names = Vec::new();
        let mut add_image = |id: u64, height: usize, width: usize, write: bool| {
            let name = format!("COCO_{split}_{id:012}.jpg");
            if write {
                write_jpeg(&coco.join(split).join(&name), height, width, id);
            }
            images.push(json!({"id": id, "file_name": name, "height": height, "width": width}));
            name
        };
        let mut annotate = |image: u64,
                            class: usize,
                            segmentation: serde_json::Value,
                            crowd: u8| {
            let id = next_annotation;
            next_annotation += 1;
            json!({"id": id, "image_id": image, "category_id": sorted[class - 1],
                   "iscrowd": crowd, "segmentation": segmentation, "area": 1.0, "bbox": [0, 0, 1, 1]})
        };
        for (k, &class) in classes.iter().enumerate() {
            for copy in 0..2u64 {
                let id = 1000 * (1 + copy) + k as u64 + if split == "val2014" { 500 } else { 0 };
                names.push(add_image(id, 48, 48, true));
                let polygon = json!([[1.0, 1.0, 47.0, 1.0, 47.0, 47.0, 1.0, 47.0]]);
                annotations.push(annotate(id, class, polygon, 0));
            }
        }
        if split == "train2014" {
            let mut rng = EpisodeRng::new(5, 2, 0);
            // Hard geometry: random polygons (some reaching outside), multi-part objects,
            // overlaps, an uncompressed and a compressed crowd RLE.
            for n in 0..6u64 {
                let (id, height, width) = (5000 + n, 60 + 3 * n as usize, 80 - 5 * n as usize);
                names.push(add_image(id, height, width, true));
                for object in 0..5 {
                    let parts = 1 + rng.below(2);
                    let polygons: Vec<Vec<f64>> = (0..parts)
                        .map(|_| {
                            let points = 3 + rng.below(6);
                            (0..points)
                                .flat_map(|_| {
                                    [
                                        rng.uniform(-8.0, width as f64 + 8.0),
                                        rng.uniform(-8.0, height as f64 + 8.0),
                                    ]
                                })
                                .map(|v| (v * 100.0).round() / 100.0)
                                .collect()
                        })
                        .collect();
                    annotations.push(annotate(
                        id,
                        1 + (7 * n as usize + object) % 80,
                        json!(polygons),
                        0,
                    ));
                }
                // Crowd: runs alternating over the whole image.
                let total = height * width;
                let mut counts = Vec::new();
                let mut left = total;
                while left > 0 {
                    let run = (1 + rng.below(200)).min(left);
                    counts.push(run);
                    left -= run;
                }
                let mut crowd = annotate(
                    id,
                    1 + (3 * n as usize) % 80,
                    json!({"counts": counts, "size": [height, width]}),
                    1,
                );
                if n % 2 == 1 {
                    // The python fixture script turns it into a compressed string.
                    crowd["compress"] = json!(true);
                }
                annotations.insert(annotations.len() - 2, crowd);
            }
            // Bad records: an unknown category, an annotation of an unlisted image, a missing
            // image file, an RLE whose counts do not cover the image, a size that is not the
            // image's.
            add_image(6000, 48, 48, true);
            let mut unknown = annotate(6000, 1, json!([[1, 1, 9, 1, 9, 9]]), 0);
            unknown["category_id"] = json!(12);
            annotations.push(unknown);
            annotations.push(annotate(999_999, 1, json!([[1, 1, 9, 1, 9, 9]]), 0));
            add_image(6001, 48, 48, false);
            annotations.push(annotate(6001, 1, json!([[1, 1, 9, 1, 9, 9]]), 0));
            add_image(6002, 48, 48, true);
            annotations.push(annotate(
                6002,
                1,
                json!({"counts": [100, 20], "size": [48, 48]}),
                1,
            ));
            let name = add_image(6003, 40, 48, false);
            write_jpeg(&coco.join(split).join(name), 48, 48, 6003);
            annotations.push(annotate(6003, 1, json!([[1, 1, 9, 1, 9, 9]]), 0));
            // An image without annotations: left out of the list.
            add_image(6004, 48, 48, true);
            // Polygon lists as pycocotools reads them: odd lengths (the last number ignored: 7
            // numbers are a triangle, 5 a line), short polygons after the first one.
            names.push(add_image(6005, 48, 48, true));
            annotations.push(annotate(6005, 2, json!([[3, 3, 40, 3, 40, 40, 3]]), 0));
            annotations.push(annotate(
                6005,
                3,
                json!([[5, 30, 20, 30, 20, 45, 5, 45, 9], [1], [], [2, 2, 4, 4]]),
                0,
            ));
            annotations.push(annotate(6005, 4, json!([[30.5, 5.5, 44.2, 9.1, 35.3]]), 0));
            // Lists that pycocotools raises on (a first polygon of 4 numbers, which it takes for
            // boxes; of 2; none): their images are skipped.
            for (id, segmentation) in [
                (6006, json!([[1, 1, 9, 1], [1, 1, 9, 1, 9, 9]])),
                (6007, json!([[1, 1]])),
                (6008, json!([])),
            ] {
                add_image(id, 48, 48, true);
                annotations.push(annotate(id, 1, segmentation, 0));
            }
        }
        let file = coco_file(&images, &annotations, &ids);
        let path = coco.join(format!("annotations/instances_{split}.json"));
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, serde_json::to_string(&file).unwrap()).unwrap();
        listed.insert(split, names);
    }
    let expected = root.join("expected");
    run_ok(
        Command::new(python)
            .args(["-c", COCO_EXPECTED])
            .arg(&coco)
            .arg(&expected),
    );
    let sort = |mut names: Vec<String>| {
        names.sort();
        names
    };
    CocoFixture {
        coco,
        train: sort(listed.remove("train2014").unwrap()),
        val: sort(listed.remove("val2014").unwrap()),
    }
}

/// Compresses the marked RLEs with pycocotools, then writes the expected label of every good image
/// with pycocotools' annToMask: objects in file order, later on top, crowd as its class or 255; and
/// the ids of the images whose annotations annToMask raises on, to `raises.txt`.
const COCO_EXPECTED: &str = r#"
import json, os, sys
import numpy as np
from pycocotools.coco import COCO
from pycocotools import mask as mu
coco_dir, out = sys.argv[1], sys.argv[2]
bad = {6000, 6001, 6002, 6003}
raises = set()
for split in ["train2014", "val2014"]:
    path = os.path.join(coco_dir, "annotations", "instances_%s.json" % split)
    data = json.load(open(path))
    for a in data["annotations"]:
        if a.pop("compress", False):
            h, w = a["segmentation"]["size"]
            rle = mu.frPyObjects(a["segmentation"], h, w)
            a["segmentation"] = {"size": [h, w], "counts": rle["counts"].decode()}
    json.dump(data, open(path, "w"))
    coco = COCO(path)
    index = {c: i + 1 for i, c in enumerate(sorted(coco.getCatIds()))}
    for mode in ["class", "ignore"]:
        os.makedirs(os.path.join(out, mode, split), exist_ok=True)
        for img in coco.loadImgs(coco.getImgIds()):
            anns = coco.imgToAnns[img["id"]]
            if img["id"] in bad or not anns:
                continue
            label = np.zeros((img["height"], img["width"]), np.uint8)
            try:
                for a in anns:
                    m = coco.annToMask(a)
                    label[m > 0] = 255 if (a["iscrowd"] and mode == "ignore") else index[a["category_id"]]
            except Exception:
                raises.add(img["id"])
                continue
            label.tofile(os.path.join(out, mode, split, img["file_name"][:-4] + ".bin"))
open(os.path.join(out, "raises.txt"), "w").write("".join("%d\n" % i for i in sorted(raises)))
"#;

/// Both --crowd choices into one output folder, one after the other: the second run rewrites the
/// labels with crowd regions (and only those), since a label is kept only when it was made from
/// the same inputs and options.
#[test]
fn coco_labels_match_pycocotools_and_pass_check() {
    let python = python_with(&["pycocotools", "numpy"]);
    let root = scratch("coco");
    let fixture = coco_fixture(&root, &python);
    assert_eq!(
        std::fs::read_to_string(root.join("expected/raises.txt")).unwrap(),
        "6006\n6007\n6008\n",
        "pycocotools raises on other images than the fixture expects"
    );
    let out = root.join("out");
    for (crowd, mode) in [(CrowdLabel::Class, "class"), (CrowdLabel::Ignore, "ignore")] {
        let lists = root.join(format!("lists_{mode}"));
        let summary = prepare_coco(&CocoOptions {
            coco: fixture.coco.clone(),
            out: out.clone(),
            lists: lists.clone(),
            images: ImageMode::Link,
            crowd,
            threads: 2,
        })
        .unwrap();
        for (split, names, list) in [
            ("train2014", &fixture.train, "train_data_list.txt"),
            ("val2014", &fixture.val, "val_data_list.txt"),
        ] {
            let text = std::fs::read_to_string(lists.join(list)).unwrap();
            let expected_lines: Vec<String> = names
                .iter()
                .map(|n| format!("{split}/{n} annotations/{split}/{}.png", &n[..n.len() - 4]))
                .collect();
            assert_eq!(text.lines().collect::<Vec<_>>(), expected_lines);
            for name in names {
                let stem = &name[..name.len() - 4];
                let label =
                    read_label(&out.join(format!("annotations/{split}/{stem}.png"))).unwrap();
                let expected =
                    std::fs::read(root.join(format!("expected/{mode}/{split}/{stem}.bin")))
                        .unwrap();
                let differing = label
                    .data
                    .iter()
                    .zip(&expected)
                    .filter(|(a, b)| a != b)
                    .count();
                assert!(
                    label.data.len() == expected.len() && differing == 0,
                    "{mode} {name}: {differing} of {} pixels differ from pycocotools",
                    expected.len()
                );
                assert!(out.join(split).join(name).is_file());
            }
        }
        let skipped = reasons(&summary);
        for (file, reason) in [
            ("instances_train2014.json", "has category 12"),
            ("instances_train2014.json", "refers to image 999999"),
            ("COCO_train2014_000000006001.jpg", "image file missing"),
            ("instances_train2014.json", "RLE counts add up to 120"),
            (
                "COCO_train2014_000000006003.jpg",
                "48x48 but its annotation is 48x40",
            ),
            (
                "instances_train2014.json",
                "image 6006 (COCO_train2014_000000006006.jpg): annotation",
            ),
            (
                "instances_train2014.json",
                "image 6007 (COCO_train2014_000000006007.jpg): annotation",
            ),
            (
                "instances_train2014.json",
                "image 6008 (COCO_train2014_000000006008.jpg): annotation",
            ),
        ] {
            assert!(
                skipped
                    .iter()
                    .any(|s| s.contains(file) && s.contains(reason)),
                "no `{file}: …{reason}…` in {skipped:#?}"
            );
        }
        let unreadable = skipped
            .iter()
            .filter(|s| s.contains("pycocotools' annToMask cannot read this annotation either"))
            .count();
        assert_eq!(unreadable, 3, "{skipped:#?}");
        assert_eq!(skipped.len(), 8, "{skipped:#?}");
        if crowd == CrowdLabel::Ignore {
            // The six images with crowd regions; the other labels are the class run's.
            assert_eq!(
                (summary.labels_written, summary.labels_outdated),
                (6, 6),
                "{summary}"
            );
            assert!(
                summary
                    .to_string()
                    .contains("labels: 6 rewritten because their inputs or options changed"),
                "{summary}"
            );
        }
        assert!(
            summary.notes[0].contains("1 without any left out"),
            "{summary}"
        );
        if crowd == CrowdLabel::Class {
            let config = Config {
                data_root: out.clone(),
                train_list: lists.join("train_data_list.txt"),
                val_list: lists.join("val_data_list.txt"),
                use_coco: true,
                use_split_coco: true,
                ..Config::default()
            };
            let report = check_dataset(&config);
            assert!(report.is_clean(), "{:#?}", report.problems);
        }
    }
}

/// A label is kept only while the inputs that would make it now are the ones recorded for it: a
/// VOC annotation added for an id labelled from SBD's MAT-file replaces that label, a MAT-file
/// changed since rewrites its label, and labels without a record (from before records were kept)
/// are rewritten once. A rerun with the same inputs writes nothing.
#[test]
fn pascal_rerun_rewrites_labels_whose_inputs_changed() {
    let python = python_with(&["scipy", "numpy"]);
    let root = scratch("provenance");
    let fixture = pascal_fixture(&root, &python);
    let options = pascal_options(&fixture, &root, ImageMode::Link);
    let labelled = fixture.train.len() + fixture.val.len();
    let first = prepare_pascal(&options).unwrap();
    assert_eq!(first.labels_written, labelled);
    let rerun = prepare_pascal(&options).unwrap();
    assert_eq!((rerun.labels_written, rerun.labels_kept), (0, labelled));

    let label = |id: &str| read_label(&root.join(format!("out/SegmentationClassAug/{id}.png")));
    let voc_label = drawn_label(9, 0, true, 500);
    assert!(label("sbd_15").unwrap() == fixture.expected["sbd_15"]);
    write_palette_png(
        &fixture.voc.join("SegmentationClass/sbd_15.png"),
        &voc_label,
    );
    std::fs::File::options()
        .write(true)
        .open(fixture.sbd.join("cls/sbd_16.mat"))
        .unwrap()
        .set_modified(SystemTime::now())
        .unwrap();
    let changed = prepare_pascal(&options).unwrap();
    assert_eq!(
        (changed.labels_written, changed.labels_outdated),
        (2, 2),
        "{changed}"
    );
    assert!(
        changed
            .to_string()
            .contains("labels: 2 rewritten because their inputs or options changed"),
        "{changed}"
    );
    assert!(
        label("sbd_15").unwrap() == voc_label,
        "VOC's annotation must win"
    );
    assert!(label("sbd_16").unwrap() == fixture.expected["sbd_16"]);

    std::fs::remove_file(root.join("out/svf-data-labels.jsonl")).unwrap();
    let unrecorded = prepare_pascal(&options).unwrap();
    assert_eq!(
        (unrecorded.labels_written, unrecorded.labels_unrecorded),
        (labelled, labelled)
    );
    assert!(
        unrecorded.to_string().contains(&format!(
            "note: {labelled} label(s) already there had no record of what made them"
        )),
        "{unrecorded}"
    );
    let rerun = prepare_pascal(&options).unwrap();
    assert_eq!((rerun.labels_written, rerun.labels_kept), (0, labelled));
}

/// `--copy` after a linking run replaces the links by copies (the download may be deleted next); a
/// dangling link is replaced in either mode.
#[test]
fn copy_replaces_the_links_of_an_earlier_run() {
    let python = python_with(&["scipy", "numpy"]);
    let root = scratch("copy-over-links");
    let fixture = pascal_fixture(&root, &python);
    let images = fixture.train.len() + fixture.val.len();
    let image = |id: &str| root.join(format!("out/JPEGImages/{id}.jpg"));
    prepare_pascal(&pascal_options(&fixture, &root, ImageMode::Link)).unwrap();
    std::fs::remove_file(image("voc_0")).unwrap();
    std::os::unix::fs::symlink(root.join("gone.jpg"), image("voc_0")).unwrap();
    let relinked = prepare_pascal(&pascal_options(&fixture, &root, ImageMode::Link)).unwrap();
    assert_eq!(relinked.images_placed, 1, "{relinked}");
    assert!(image("voc_0").is_file());

    let copied = prepare_pascal(&pascal_options(&fixture, &root, ImageMode::Copy)).unwrap();
    assert_eq!(
        (copied.images_placed, copied.images_kept),
        (images, 0),
        "{copied}"
    );
    for id in fixture.train.iter().chain(&fixture.val) {
        let metadata = image(id).symlink_metadata().unwrap();
        assert!(metadata.is_file(), "{id} is still a link");
        let source = fixture.voc.join(format!("JPEGImages/{id}.jpg"));
        assert!(std::fs::read(image(id)).unwrap() == std::fs::read(source).unwrap());
    }
}

/// A COCO download without pycocotools' help, 16×16 images: in train, image 1 with a square and
/// image 2 whose annotation names a category COCO does not have; in val, image 3 with a square.
/// With `linked`, the images of the download are links to the files in `store/`.
fn small_coco(root: &Path, linked: bool) -> PathBuf {
    let coco = root.join("coco");
    for (split, ids) in [("train2014", &[1u64, 2][..]), ("val2014", &[3][..])] {
        let mut images = Vec::new();
        let mut annotations = Vec::new();
        for &id in ids {
            let name = format!("COCO_{split}_{id:012}.jpg");
            let path = coco.join(split).join(&name);
            if linked {
                let stored = root.join("store").join(&name);
                write_jpeg(&stored, 16, 16, id);
                std::fs::create_dir_all(path.parent().unwrap()).unwrap();
                std::os::unix::fs::symlink(&stored, &path).unwrap();
            } else {
                write_jpeg(&path, 16, 16, id);
            }
            images.push(json!({"id": id, "file_name": name, "height": 16, "width": 16}));
            annotations.push(json!({"id": id, "image_id": id,
                "category_id": if id == 2 { 12 } else { 1 }, "iscrowd": 0,
                "segmentation": [[2, 2, 12, 2, 12, 12, 2, 12]]}));
        }
        let path = coco.join(format!("annotations/instances_{split}.json"));
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        let file = coco_file(&images, &annotations, &category_ids());
        std::fs::write(&path, serde_json::to_string(&file).unwrap()).unwrap();
    }
    coco
}

fn small_coco_options(coco: &Path, out: &Path, images: ImageMode) -> CocoOptions {
    CocoOptions {
        coco: coco.to_path_buf(),
        out: out.to_path_buf(),
        lists: out.join("lists"),
        images,
        crowd: CrowdLabel::Class,
        threads: 1,
    }
}

/// With `--out` = the download folder the images are their own targets: `--copy` leaves them as
/// they are, links included.
#[test]
fn copy_into_the_download_folder_leaves_its_images_alone() {
    let root = scratch("copy-in-place");
    let coco = small_coco(&root, true);
    let summary = prepare_coco(&small_coco_options(&coco, &coco, ImageMode::Copy)).unwrap();
    assert_eq!(
        (summary.images_placed, summary.images_kept),
        (0, 2),
        "{summary}"
    );
    for name in [
        "train2014/COCO_train2014_000000000001.jpg",
        "val2014/COCO_val2014_000000000003.jpg",
    ] {
        let metadata = coco.join(name).symlink_metadata().unwrap();
        assert!(metadata.file_type().is_symlink(), "{name} was replaced");
    }
}

/// A second prepare on an output folder in use is refused with the lock file and the holder's pid,
/// before it writes anything there.
#[test]
fn output_folder_in_use_is_refused() {
    let root = scratch("prepare-locked");
    let coco = small_coco(&root, false);
    let out = root.join("out");
    std::fs::create_dir_all(&out).unwrap();
    let held = svf::dir_lock::lock_dir(&out, LOCK_FILE).unwrap();
    let error = prepare_coco(&small_coco_options(&coco, &out, ImageMode::Link)).unwrap_err();
    let message = error.to_string();
    assert!(
        matches!(error, PrepareError::OutputInUse { .. }),
        "{message}"
    );
    assert!(
        message.contains(&format!(
            "another svf-data prepare (pid {}) is writing into this output folder: it holds {}",
            std::process::id(),
            out.join(LOCK_FILE).display()
        )),
        "{message}"
    );
    let entries: Vec<_> = std::fs::read_dir(&out).unwrap().collect();
    assert_eq!(entries.len(), 1, "{entries:?}");
    drop(held);
    prepare_coco(&small_coco_options(&coco, &out, ImageMode::Link)).unwrap();
}

/// An error that stops a run after a finished split still reports that split: its list and its
/// skipped files, before the error.
#[test]
fn an_error_after_a_finished_split_reports_what_was_done() {
    let root = scratch("prepare-stopped");
    let coco = small_coco(&root, false);
    let val = coco.join("annotations/instances_val2014.json");
    let text = std::fs::read_to_string(&val).unwrap();
    std::fs::write(&val, &text[..text.len() / 2]).unwrap();
    let out = root.join("out");
    let output = Command::new(env!("CARGO_BIN_EXE_svf-data"))
        .args(["prepare", "coco", "--coco"])
        .arg(&coco)
        .arg("--out")
        .arg(&out)
        .arg("--lists")
        .arg(out.join("lists"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    let summary = stderr
        .find("stopped by the error below; done until then")
        .unwrap_or_else(|| panic!("no summary in {stderr}"));
    let error = stderr.find("instances_val2014.json: not a COCO instances file");
    assert!(error.is_some_and(|e| e > summary), "{stderr}");
    for line in [
        "labels: 1 written, 0 already there; images: 1 placed, 0 already there",
        "train_data_list.txt: 1 images",
        "1 file(s) skipped",
        "image 2 (COCO_train2014_000000000002.jpg): annotation 2 has category 12",
    ] {
        assert!(stderr.contains(line), "no `{line}` in {stderr}");
    }
}

#[test]
fn lists_help_says_relative_to_the_current_directory() {
    for dataset in ["pascal", "coco"] {
        let output = run_ok(
            Command::new(env!("CARGO_BIN_EXE_svf-data")).args(["prepare", dataset, "--help"]),
        );
        let help = String::from_utf8_lossy(&output.stdout);
        assert!(
            help.contains("relative to the current directory like --out")
                && !help.contains("relative to the repository"),
            "{help}"
        );
    }
}
