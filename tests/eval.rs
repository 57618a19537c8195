//! Whole-pipeline tests of evaluation and the paper tables on the synthetic dataset, with a
//! tiny model (ResNet-18 at width 1/8, 65×65 inputs).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

mod common;

use common::scratch;
use svf::config::Config;
use svf::data::{EpisodeLoader, FewShotDataset, Split};
use svf::eval::{self, EvalOptions};
use svf::metrics::IoUAccumulator;
use tch::{nn, Device, Kind, Tensor};

/// The evaluation tests' model: [`common::tiny_config`] at width 1/8, bins 4 and 2, 8 validation
/// episodes of batch 4.
fn tiny_base(run: &Path) -> Config {
    Config {
        backbone_width: 0.125,
        ppm_scales: vec![4, 2],
        batch_size: 4,
        val_episodes: 8,
        ..common::tiny_config(run.to_path_buf())
    }
}

/// The YAML of [`tiny_base`], as the commands read it.
fn tiny_yaml(run: &Path) -> String {
    tiny_base(run).to_yaml()
}

/// [`tiny_base`] with `key=value` overrides, as `--set` applies them.
fn tiny_config(run: &Path, overrides: &[&str]) -> Config {
    let overrides: Vec<String> = overrides.iter().map(|s| s.to_string()).collect();
    Config::from_yaml_str(&tiny_yaml(run), Path::new("tiny.yaml"), &overrides).unwrap()
}

/// Random weights of `config`'s model written as a state dict; returns the file. Random weights
/// alone predict background everywhere (an mIoU of 0 compares nothing), so the foreground logit
/// is shifted by its median margin on the first validation episode: about half of its pixels, and
/// some of every episode's, become foreground.
fn random_weights(config: &Config, dir: &Path) -> PathBuf {
    tch::manual_seed(7);
    let vs = nn::VarStore::new(Device::Cpu);
    let model = svf::model::PfeNet::new(&vs.root(), config).unwrap();
    let dataset = Arc::new(FewShotDataset::open(config, Split::Val).unwrap());
    let episode = EpisodeLoader::new(dataset, config.manual_seed, 0..1, 1, 1)
        .next()
        .unwrap()
        .unwrap();
    tch::no_grad(|| {
        let logits = model
            .forward(
                &episode.query_image,
                &episode.support_images,
                &episode.support_labels,
                false,
            )
            .logits;
        let margin = (logits.select(1, 1) - logits.select(1, 0)).median();
        let _ = vs.variables()["cls.3.bias"].get(1).g_sub_(&margin);
    });
    let path = dir.join("random.safetensors");
    let named = svf::model::model_weights(&vs);
    Tensor::write_safetensors(&named, &path).unwrap();
    path
}

#[test]
fn same_checkpoint_and_seed_give_identical_results_with_any_thread_count() {
    let run = scratch("repeat");
    let config = tiny_config(&run, &[]);
    let weights = random_weights(&config, &run);
    let (_vs, model) = svf::inference::load_model(&config, &weights, Device::Cpu, true).unwrap();
    let mut options = EvalOptions::for_validation(&config);
    options.episodes = 6;
    options.seeds = vec![3, 4];
    options.batch_size = 2;
    options.workers = 1;
    let one = eval::evaluate(&model, &config, Device::Cpu, &options).unwrap();
    options.workers = 3;
    let three = eval::evaluate(&model, &config, Device::Cpu, &options).unwrap();
    assert_eq!(one.seeds, three.seeds);
    assert_eq!(one.miou, three.miou);
    assert!(one.miou.mean > 0.0, "{one:?}");
    assert_ne!(
        (one.seeds[0].miou, one.seeds[0].fb_iou),
        (one.seeds[1].miou, one.seeds[1].fb_iou),
        "different seeds, different episodes"
    );
    assert_eq!(one.seeds.len(), 2);
    assert_eq!(one.class_iou.iter().map(|c| c.episodes).sum::<u64>(), 12);
}

#[test]
fn fused_svf_model_scores_as_the_decomposed_one() {
    let run = scratch("fused");
    // The reference's rank rounding (multiple of 4) truncates the stem: the fused weights must
    // still compute what the decomposed model computes.
    let config = tiny_config(&run, &["svf=true"]);
    let weights = random_weights(&config, &run);
    let mut options = EvalOptions::for_validation(&config);
    options.episodes = 4;
    let (_vs, decomposed) =
        svf::inference::load_model(&config, &weights, Device::Cpu, false).unwrap();
    let (fvs, fused) = svf::inference::load_model(&config, &weights, Device::Cpu, true).unwrap();
    assert!(fvs.variables().keys().all(|n| !n.contains("vector_S")));
    tch::manual_seed(1);
    let query = Tensor::randn([1, 3, 65, 65], (Kind::Float, Device::Cpu));
    let supports = Tensor::randn([1, 1, 3, 65, 65], (Kind::Float, Device::Cpu));
    let labels = Tensor::randint(2, [1, 1, 65, 65], (Kind::Int64, Device::Cpu));
    let logits = |model: &svf::model::FewShotModel| {
        tch::no_grad(|| model.logits(&query, &supports, &labels))
    };
    let (a, b) = (logits(&decomposed), logits(&fused));
    let scale = f64::try_from(a.abs().max()).unwrap();
    let diff = f64::try_from((&a - &b).abs().max()).unwrap();
    assert!(
        diff <= 1e-4 * scale.max(1.0),
        "logits differ by {diff} (scale {scale})"
    );
    let slow = eval::evaluate(&decomposed, &config, Device::Cpu, &options).unwrap();
    let fast = eval::evaluate(&fused, &config, Device::Cpu, &options).unwrap();
    assert!(
        (slow.miou.mean - fast.miou.mean).abs() < 1e-4,
        "{slow:?} vs {fast:?}"
    );
    assert!((slow.fb_iou.mean - fast.fb_iou.mean).abs() < 1e-4);
    assert!(slow.miou.mean > 0.0, "{slow:?}");
    assert_eq!(fast.setting.method, "PFENet+SVF");
}

#[test]
fn eval_writes_results_and_panels() {
    let run = scratch("panels");
    let config = tiny_config(&run, &[]);
    let weights = random_weights(&config, &run);
    let yaml = run.join("tiny.yaml");
    std::fs::write(&yaml, tiny_yaml(&run)).unwrap();
    common::run_ok(
        Command::new(env!("CARGO_BIN_EXE_svf-eval"))
            .arg("--config")
            .arg(&yaml)
            .arg("--weights")
            .arg(&weights)
            .args([
                "--episodes",
                "3",
                "--seeds",
                "1,2",
                "--save-vis",
                "2",
                "--device",
                "cpu",
            ]),
    );
    let result = svf::results::EvalResult::read(&run.join("eval.json")).unwrap();
    assert_eq!(
        result.seeds.iter().map(|s| s.seed).collect::<Vec<_>>(),
        vec![1, 2]
    );
    assert!(std::fs::read_to_string(run.join("eval.md"))
        .unwrap()
        .contains("mean ± std"));
    for index in 0..2 {
        let panel = image::open(run.join(format!("vis/episode_{index:05}.png"))).unwrap();
        // Three 65-pixel tiles enlarged 3 times under a two-line title strip.
        assert_eq!(panel.height(), 2 * (14 + 8) + 3 * 65 + 4);
    }
    assert!(!run.join("vis/episode_00002.png").exists());
}

fn run_script(args: &[&str]) -> std::process::Output {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let bin_dir = Path::new(env!("CARGO_BIN_EXE_svf-eval")).parent().unwrap();
    common::run_ok(
        Command::new("bash")
            .arg(root.join("scripts/reproduce_tables.sh"))
            .arg("--bin-dir")
            .arg(bin_dir)
            .args(args),
    )
}

#[test]
fn reproduce_tables_dry_run_lists_the_paper_grid() {
    let output = run_script(&["--dry-run", "--out", "/nonexistent/tables"]);
    let text = String::from_utf8(output.stdout).unwrap();
    let runs: Vec<&str> = text.lines().filter(|l| l.starts_with("run ")).collect();
    let bases: Vec<&str> = text.lines().filter(|l| l.starts_with("base ")).collect();
    // PASCAL and COCO x folds 0-3 x ResNet-50/VGG-16 x 1/5-shot x PFENet†/BAM† with/without SVF,
    // and BAM's base stage once per dataset, fold and backbone.
    assert_eq!(runs.len(), 128, "{text}");
    assert_eq!(bases.len(), 16, "{text}");
    assert_eq!(text.lines().count(), 3 * 128 + 2 * 16 + 1, "{text}");
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let index_of = |needle: &str| {
        text.find(needle)
            .unwrap_or_else(|| panic!("{needle}: {text}"))
    };
    for dataset in ["pascal", "coco"] {
        for fold in 0..4 {
            for backbone in ["resnet50", "vgg16"] {
                let suffix = if backbone == "vgg16" { "_vgg16" } else { "" };
                // (run name, config file) of every variant; each config exists.
                let variants = [
                    (
                        "pfenet",
                        format!("paper/{dataset}_split{fold}_{backbone}_pfenet.yaml"),
                    ),
                    (
                        "svf",
                        format!("paper/{dataset}_split{fold}_{backbone}_svf.yaml"),
                    ),
                    ("bam", format!("bam/{dataset}_split{fold}{suffix}_bam.yaml")),
                    (
                        "bam_svf",
                        format!("bam/{dataset}_split{fold}{suffix}_svf.yaml"),
                    ),
                ];
                let base_name = format!("{dataset}/split{fold}/{backbone}/base");
                let base_config = format!("configs/bam/{dataset}_split{fold}{suffix}_base.yaml");
                assert!(root.join(&base_config).is_file(), "{base_config}");
                let base_line = format!(": {base_name}\n");
                assert_eq!(text.matches(&base_line).count(), 1, "{base_name}: {text}");
                for (variant, config) in &variants {
                    assert!(root.join("configs").join(config).is_file(), "{config}");
                    for shot in [1, 5] {
                        let name =
                            format!(": {dataset}/split{fold}/{backbone}/{shot}shot/{variant}");
                        assert_eq!(
                            runs.iter().filter(|l| l.ends_with(&name)).count(),
                            1,
                            "{name}"
                        );
                        if variant.starts_with("bam") {
                            // Trained on the base stage's run, which comes first.
                            let run = index_of(&format!("{name}\n"));
                            assert!(index_of(&base_line) < run, "{name}");
                            let train = &text[run..run + text[run..].find(" --device").unwrap()];
                            assert!(
                                train.contains(&format!(
                                    "{config} --set base_learner=/nonexistent/tables/{base_name} "
                                )),
                                "{train}"
                            );
                        }
                    }
                }
            }
        }
    }
    assert!(
        text.contains("paper/coco_split3_vgg16_svf.yaml --set shot=5"),
        "{text}"
    );
    assert_eq!(text.matches("--protocol paper").count(), 128, "{text}");
    // --only keeps the matching subset; --methods the chosen methods.
    let output = run_script(&["--dry-run", "--only", "pascal/split2/resnet50"]);
    let text = String::from_utf8(output.stdout).unwrap();
    let runs: Vec<&str> = text.lines().filter(|l| l.starts_with("run ")).collect();
    assert_eq!(runs.len(), 8, "{text}");
    assert!(
        runs.iter().all(|l| l.contains(": pascal/split2/resnet50/")),
        "{text}"
    );
    let output = run_script(&["--dry-run", "--methods", "pfenet", "--only", "coco/split1"]);
    let text = String::from_utf8(output.stdout).unwrap();
    assert_eq!(
        text.lines().filter(|l| l.starts_with("run ")).count(),
        8,
        "{text}"
    );
    assert!(
        !text.lines().any(|l| l.starts_with("base ")) && !text.contains("bam"),
        "{text}"
    );
}

#[test]
fn reproduce_tables_dry_run_lists_the_32_pfenet_recipe_runs() {
    let output = run_script(&[
        "--recipe",
        "pfenet",
        "--dry-run",
        "--out",
        "/nonexistent/tables",
    ]);
    let text = String::from_utf8(output.stdout).unwrap();
    let runs: Vec<&str> = text.lines().filter(|l| l.starts_with("run ")).collect();
    assert_eq!(runs.len(), 32, "{text}");
    for dataset in ["pascal", "coco"] {
        for fold in 0..4 {
            for shot in [1, 5] {
                for variant in ["baseline", "svf"] {
                    let name = format!(": {dataset}/split{fold}/{shot}shot/{variant}");
                    assert_eq!(
                        runs.iter().filter(|l| l.ends_with(&name)).count(),
                        1,
                        "{name}"
                    );
                }
            }
        }
    }
    assert!(
        text.contains("coco_split3.yaml --set svf=true --set shot=5"),
        "{text}"
    );
    assert!(text.contains("--master-seed 123 --seed-count 5"));
    assert!(text.contains("svf-report"));
}

#[test]
fn reproduce_tables_refuses_a_missing_value_words_outside_the_grid_and_missing_configs() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    for (args, status, message) in [
        (&["--only"][..], 2, "--only needs a value"),
        (
            &["--folds", "0 7"][..],
            2,
            "--folds takes words of \"0 1 2 3\", not 7",
        ),
        (
            &["--shots", "3"][..],
            2,
            "--shots takes words of \"1 5\", not 3",
        ),
        (
            &["--svf", "yes"][..],
            2,
            "--svf takes words of \"false true\", not yes",
        ),
        (
            &["--backbones", "resnet101"][..],
            2,
            "--backbones takes words of \"resnet50 vgg16\", not resnet101",
        ),
        // PFENet's own recipe has ResNet-50 PFENet configs only.
        (
            &["--recipe", "pfenet", "--backbones", "vgg16"][..],
            2,
            "--recipe pfenet trains ResNet-50 only",
        ),
        (
            &["--recipe", "pfenet", "--methods", "pfenet bam"][..],
            2,
            "--recipe pfenet trains PFENet only",
        ),
        (&["--config-dir", "/nonexistent"][..], 1, "missing config"),
    ] {
        let output = Command::new("bash")
            .arg(root.join("scripts/reproduce_tables.sh"))
            .arg("--dry-run")
            .args(args)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(status), "{args:?}: {stderr}");
        assert!(stderr.contains(message), "{args:?}: {stderr}");
    }
}

#[test]
fn reproduce_tables_on_synthetic_data_fills_every_cell() {
    let dir = scratch("tables");
    let configs = dir.join("configs");
    std::fs::create_dir_all(&configs).unwrap();
    std::fs::write(
        configs.join("pascal_split0.yaml"),
        tiny_yaml(&dir.join("unused")),
    )
    .unwrap();
    let out = dir.join("out");
    let args = [
        "--recipe",
        "pfenet",
        "--out",
        out.to_str().unwrap(),
        "--config-dir",
        configs.to_str().unwrap(),
        "--datasets",
        "pascal",
        "--folds",
        "0",
        "--shots",
        "1",
        "--episodes",
        "4",
        "--seed-count",
        "2",
        "--device",
        "cpu",
        "--set",
        "epochs=1",
        "--set",
        "train_episodes=4",
    ];
    run_script(&args);
    let tables = std::fs::read_to_string(out.join("tables.md")).unwrap();
    // The chart beside the tables.
    let chart = image::open(out.join("tables.png")).unwrap();
    assert_eq!(chart.height(), 480);
    for method in ["PFENet", "PFENet+SVF"] {
        for metric in ["mIoU", "FB-IoU"] {
            let section = tables
                .split(&format!("## PASCAL-5i: {metric}"))
                .nth(1)
                .unwrap();
            let row = section
                .lines()
                .find(|l| l.starts_with(&format!("| {method} | ResNet-18 x0.125 | 1 |")))
                .unwrap_or_else(|| panic!("no {method} row in {metric}:\n{tables}"));
            let cells: Vec<&str> = row.split('|').map(str::trim).collect();
            // | method | backbone | shot | fold 0 | ... : fold 0 and the mean hold numbers.
            assert!(cells[4].parse::<f64>().is_ok(), "{row}");
            assert!(
                cells[8].trim_end_matches('*').parse::<f64>().is_ok(),
                "{row}"
            );
            assert!(
                cells[1..cells.len() - 1].iter().all(|c| !c.is_empty()),
                "{row}"
            );
        }
    }
    // Finished runs are skipped.
    let again = run_script(&args);
    let log = String::from_utf8_lossy(&again.stdout);
    assert_eq!(log.matches("eval.json exists, skipped").count(), 2, "{log}");
}

#[test]
fn reproduce_tables_runs_one_paper_cell_into_the_report() {
    let dir = scratch("paper-cell");
    let configs = dir.join("configs");
    std::fs::create_dir_all(&configs).unwrap();
    // BAM's filter drops the images with novel objects: more images than the shared dataset's
    // 60 keep two of every training class.
    let data = dir.join("data");
    let (train_list, val_list) = svf::data::synth::write_dataset(
        &data,
        &svf::data::synth::SynthOptions {
            train_images: 160,
            val_images: 60,
            size: 112,
            seed: 7,
        },
    )
    .unwrap();
    // A paper-style config pair: a shared recipe file and a few lines per cell over it.
    let recipe = Config {
        data_root: data,
        train_list,
        val_list,
        train_filter: svf::config::TrainFilter::Bam,
        lr_schedule: svf::config::LrScheduleKind::Constant,
        head_lr_scale: 1.0,
        backbone_lr_scale: 0.1,
        dilation: svf::config::DilationPattern::Torchvision,
        ..tiny_base(&dir.join("unused"))
    };
    std::fs::write(configs.join("recipe.yaml"), recipe.to_yaml()).unwrap();
    std::fs::write(
        configs.join("pascal_split0_tiny_svf.yaml"),
        "base: recipe.yaml\nsplit: 0\nsvf: true\n",
    )
    .unwrap();
    let out = dir.join("out");
    // One tiny cell into `out`: a one-epoch run of 4 episodes, evaluated on 4 per seed.
    let run_cell = |config_dir_flag: &str, dir: &Path, only: &str, methods: &str| {
        run_script(&[
            "--out",
            out.to_str().unwrap(),
            config_dir_flag,
            dir.to_str().unwrap(),
            "--methods",
            methods,
            "--backbones",
            "tiny",
            "--only",
            only,
            "--episodes",
            "4",
            "--device",
            "cpu",
            "--set",
            "epochs=1",
            "--set",
            "train_episodes=4",
        ])
    };
    run_cell(
        "--config-dir",
        &configs,
        "pascal/split0/tiny/1shot/svf",
        "pfenet",
    );
    let result =
        svf::results::EvalResult::read(&out.join("pascal/split0/tiny/1shot/svf/eval.json"))
            .unwrap();
    // The paper's protocol: its five seeds, each evaluated.
    assert_eq!(
        result.seeds.iter().map(|s| s.seed).collect::<Vec<_>>(),
        eval::PAPER_SEEDS
    );
    assert_eq!(result.setting.method, "PFENet†+SVF");
    let tables = std::fs::read_to_string(out.join("tables.md")).unwrap();
    assert!(
        tables.contains("| PFENet†+SVF | ResNet-18 x0.125 | 1 |"),
        "{tables}"
    );

    // A BAM†+SVF cell: BAM's base stage first (its own config), then the meta stage on it.
    let bam_configs = dir.join("bam-configs");
    std::fs::create_dir_all(&bam_configs).unwrap();
    let bam = Config {
        method: svf::config::Method::Bam,
        ..recipe
    };
    std::fs::write(bam_configs.join("recipe.yaml"), bam.to_yaml()).unwrap();
    std::fs::write(
        bam_configs.join("pascal_split0_base.yaml"),
        "base: recipe.yaml\nsplit: 0\nstage: base\n",
    )
    .unwrap();
    std::fs::write(
        bam_configs.join("pascal_split0_svf.yaml"),
        "base: recipe.yaml\nsplit: 0\nsvf: true\n",
    )
    .unwrap();
    run_cell(
        "--bam-config-dir",
        &bam_configs,
        "pascal/split0/tiny/1shot/bam_svf",
        "bam",
    );
    let base_run = out.join("pascal/split0/tiny/base");
    assert!(base_run.join("train_done").is_file() && base_run.join("last.json").is_file());
    assert!(!base_run.join("eval.json").exists());
    let result =
        svf::results::EvalResult::read(&out.join("pascal/split0/tiny/1shot/bam_svf/eval.json"))
            .unwrap();
    assert_eq!(result.setting.method, "BAM†+SVF");
    let tables = std::fs::read_to_string(out.join("tables.md")).unwrap();
    assert!(
        tables.contains("| BAM†+SVF | ResNet-18 x0.125 | 1 |")
            && tables.contains("| PFENet†+SVF | ResNet-18 x0.125 | 1 |"),
        "{tables}"
    );
}

#[test]
#[ignore = "needs a CUDA device: cargo test --test eval -- --ignored on a GPU machine"]
fn accumulator_on_cuda_matches_cpu() {
    // Loads libtorch's CUDA library first (svf::device::load_cuda).
    let device = svf::device::DeviceArg::Cuda(0)
        .resolve()
        .expect("a CUDA device");
    let pred = Tensor::randint(2, [3, 17, 13], (Kind::Int64, Device::Cpu));
    let label = Tensor::randint(3, [3, 17, 13], (Kind::Int64, Device::Cpu));
    let label = label.where_self(&label.ne(2), &label.full_like(255));
    let mut cpu = IoUAccumulator::new(&[1, 2, 3]);
    cpu.add_episodes(&pred, &label, &[1, 2, 3]);
    let mut dev = IoUAccumulator::new(&[1, 2, 3]);
    dev.add_episodes(
        &pred.to_device(device),
        &label.to_device(device),
        &[1, 2, 3],
    );
    assert_eq!(cpu.class_iou(), dev.class_iou());
    assert_eq!(cpu.fb_iou(), dev.fb_iou());
    let mut deferred = IoUAccumulator::new(&[1, 2, 3]);
    deferred.add_deferred(
        &pred.to_device(device),
        &label.to_device(device),
        &[1, 2, 3],
    );
    deferred.flush();
    assert_eq!(cpu.class_iou(), deferred.class_iou());
    assert_eq!(cpu.fb_iou(), deferred.fb_iou());
}

#[test]
fn a_seed_given_twice_is_refused_before_anything_runs() {
    let output = Command::new(env!("CARGO_BIN_EXE_svf-eval"))
        .args([
            "--config",
            "never-read.yaml",
            "--weights",
            "never-read.safetensors",
        ])
        .args(["--seeds", "3,4,3"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(stderr.contains("--seeds lists 3 twice"), "{stderr}");
}
