//! `svf-bench` end to end on a test-sized model: every section runs and the JSON line parses.

use std::process::Command;

mod common;

use svf::config::Config;

#[test]
fn every_section_runs_on_a_tiny_config_and_the_json_line_parses() {
    let dir = common::scratch("all");
    let config = Config {
        svf: true,
        batch_size: 2,
        ..common::tiny_config(dir.join("run"))
    };
    let config_path = dir.join("tiny.yaml");
    std::fs::write(&config_path, config.to_yaml()).unwrap();

    let output = Command::new(env!("CARGO_BIN_EXE_svf-bench"))
        .env("OMP_NUM_THREADS", "1")
        .arg("--config")
        .arg(&config_path)
        .args([
            "--device",
            "cpu",
            "--threads",
            "1",
            "--size",
            "65",
            "--shot",
            "1,2",
        ])
        .args([
            "--warmup",
            "1",
            "--repeats",
            "2",
            "--episodes",
            "4",
            "--workers",
            "1",
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "svf-bench failed:\n{stderr}");
    let stdout = String::from_utf8(output.stdout).unwrap();
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 1, "one JSON line on stdout, got:\n{stdout}");
    let report: serde_json::Value = serde_json::from_str(lines[0]).unwrap();

    assert_eq!(report["method"], "PFENet+SVF");
    assert_eq!(report["threads"], 1);
    assert_eq!(report["repeats"], 2);
    let shots = |section: &serde_json::Value| -> Vec<u64> {
        section
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["shot"].as_u64().unwrap())
            .collect()
    };
    assert_eq!(shots(&report["train"]), [1, 2]);
    for train in report["train"].as_array().unwrap() {
        assert_eq!(train["size"], 65);
        assert_eq!(train["batch_size"], 2);
        assert!(train["episodes_per_second"].as_f64().unwrap() > 0.0);
        assert!(train["setup_s"].as_f64().unwrap() > 0.0);
        assert!(train["timing"]["cpu_median_s"].as_f64().unwrap() >= 0.0);
    }
    let eval = report["eval"].as_array().unwrap();
    assert_eq!(eval.len(), 2);
    for e in eval {
        assert_eq!(e["unfused"]["batch_size"], 1);
        assert!(e["fused"]["timing"]["median_s"].as_f64().unwrap() > 0.0);
        // The fused model computes the same function (fp32 round-off only).
        assert!(e["fused_max_abs_diff"].as_f64().unwrap() < 1e-3, "{e}");
    }
    // Two shots × two splits × one worker count.
    let loader = report["loader"].as_array().unwrap();
    assert_eq!(loader.len(), 4);
    assert!(loader.iter().all(|l| l["episodes"] == 4));
    assert!(report["decompose"]["layers"].as_u64().unwrap() > 0);
    assert!(stderr.contains("eval fused"), "{stderr}");
    assert_eq!(report["track_frozen"], false);
    let trainable = report["train"][0]["tracked_parameters"].as_i64().unwrap();
    assert!(trainable > 0);

    // The train step with autograd through every weight (the "before" of freezing).
    let output = Command::new(env!("CARGO_BIN_EXE_svf-bench"))
        .env("OMP_NUM_THREADS", "1")
        .arg("--config")
        .arg(&config_path)
        .args(["--device", "cpu", "--threads", "1", "--size", "65"])
        .args(["--shot", "2", "--what", "train,eval", "--repeats", "1"])
        .arg("--track-frozen")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "svf-bench --track-frozen failed:\n{stderr}"
    );
    let report: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(report["track_frozen"], true);
    let tracked = report["train"][0]["tracked_parameters"].as_i64().unwrap();
    assert!(
        tracked > 10 * trainable,
        "{tracked} tracked vs {trainable} trainable"
    );
    assert!(report["eval"][0]["unfused"]["tracked_parameters"].is_null());
    assert_eq!(report["train"].as_array().unwrap().len(), 1);
    assert!(report["loader"].as_array().unwrap().is_empty());
}

/// BAM+SVF through the same command: the train step and the fused evaluation (which folds the
/// meta branch's decomposed copy) for 1 and 2 shots.
#[test]
fn bam_svf_train_and_eval_sections_run() {
    let dir = common::scratch("bam");
    let config = Config {
        method: svf::config::Method::Bam,
        svf: true,
        batch_size: 2,
        ..common::tiny_config(dir.join("run"))
    };
    let config_path = dir.join("bam.yaml");
    std::fs::write(&config_path, config.to_yaml()).unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_svf-bench"))
        .env("OMP_NUM_THREADS", "1")
        .arg("--config")
        .arg(&config_path)
        .args(["--device", "cpu", "--threads", "1", "--size", "65"])
        .args(["--shot", "1,2", "--what", "train,eval"])
        .args(["--warmup", "0", "--repeats", "1"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "svf-bench failed:\n{stderr}");
    let report: serde_json::Value =
        serde_json::from_str(String::from_utf8(output.stdout).unwrap().trim()).unwrap();
    assert_eq!(report["method"], "BAM+SVF");
    assert_eq!(report["train"].as_array().unwrap().len(), 2);
    let eval = report["eval"].as_array().unwrap();
    assert_eq!(eval.len(), 2);
    for e in eval {
        assert!(e["fused_max_abs_diff"].as_f64().unwrap() < 1e-3, "{e}");
    }
    // The 2-shot model adds K-shot reweighting: 2 -> 2 -> 2 channels, 1x1 with biases.
    let trainable = |i: usize| report["train"][i]["tracked_parameters"].as_i64().unwrap();
    assert_eq!(trainable(1) - trainable(0), 2 * 2 + 2 + 2 * 2 + 2);
}

/// `--what decompose` alone prints no empty train/eval table; the CPU is named as `--device`
/// names it; more `--threads` than cores is warned about.
#[test]
fn decompose_alone_prints_no_empty_table_and_warnings_name_what_was_given() {
    let dir = common::scratch("decompose");
    let config = Config {
        svf: true,
        ..common::tiny_config(dir.join("run"))
    };
    let config_path = dir.join("tiny.yaml");
    std::fs::write(&config_path, config.to_yaml()).unwrap();
    let cores = std::thread::available_parallelism().unwrap().get();
    let threads = (cores + 1).to_string();
    let output = Command::new(env!("CARGO_BIN_EXE_svf-bench"))
        .arg("--config")
        .arg(&config_path)
        .args([
            "--set",
            "amp=bf16",
            "--device",
            "cpu",
            "--threads",
            &threads,
        ])
        .args(["--what", "decompose", "--warmup", "0", "--repeats", "1"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "svf-bench failed:\n{stderr}");
    assert!(!stderr.contains("s/episode"), "{stderr}");
    assert!(stderr.contains("decompose: "), "{stderr}");
    assert!(
        stderr.contains("this run on cpu stays in float32"),
        "{stderr}"
    );
    assert!(
        stderr.contains(&format!("--threads {threads} exceeds the {cores} core")),
        "{stderr}"
    );
}

/// BAM's base stage times its own step: the PSPNet base learner on whole images (its trainable
/// parameters, not the few-shot model's), and refuses the sections it has no counterpart of.
#[test]
fn bam_base_stage_times_the_base_learner() {
    let dir = common::scratch("bam-base");
    let config = Config {
        method: svf::config::Method::Bam,
        stage: svf::config::Stage::Base,
        batch_size: 2,
        ..common::tiny_config(dir.join("run"))
    };
    let config_path = dir.join("base.yaml");
    std::fs::write(&config_path, config.to_yaml()).unwrap();
    let bench = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_svf-bench"))
            .env("OMP_NUM_THREADS", "1")
            .arg("--config")
            .arg(&config_path)
            .args(["--device", "cpu", "--threads", "1", "--size", "65"])
            .args(["--shot", "1,2", "--warmup", "0", "--repeats", "1"])
            .args(args)
            .output()
            .unwrap()
    };
    let output = bench(&[]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "svf-bench failed:\n{stderr}");
    let report: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(report["method"], "BAM base learner (PSPNet)");
    assert_eq!(report["stage"], "base");
    // One row per size: images have no supports.
    let train = report["train"].as_array().unwrap();
    assert_eq!(train.len(), 1);
    assert_eq!(train[0]["shot"], 0);
    assert_eq!(report["eval"].as_array().unwrap().len(), 1);
    assert!(report["loader"].as_array().unwrap().is_empty());
    assert!(report["decompose"].is_null());

    let vs = tch::nn::VarStore::new(tch::Device::Cpu);
    svf::train::base::base_learner(&vs, &config, svf::backbone::Init::Random).unwrap();
    let pspnet: i64 = vs
        .variables()
        .iter()
        .filter(|(name, _)| {
            !["running_mean", "running_var", "num_batches_tracked"]
                .iter()
                .any(|s| name.ends_with(s))
        })
        .map(|(_, t)| t.numel() as i64)
        .sum();
    assert_eq!(train[0]["tracked_parameters"], pspnet);

    let output = bench(&["--what", "loader"]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(
        stderr.contains("--what loader") && stderr.contains("`stage: base`"),
        "{stderr}"
    );
}
