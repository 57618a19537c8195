//! Bad command-line values a user can type: each is one clear message naming the flag or key,
//! never a panic, and nothing runs.

use std::process::Command;

mod common;

/// Runs `binary` with the tiny config and `args`; returns its stderr after checking that it
/// failed without panicking, with one error message and no backtrace although `RUST_BACKTRACE=1`
/// asks for one (users set it for other tools; a typo in a flag is no crash).
fn fails_cleanly(binary: &str, args: &[&str]) -> String {
    let dir = common::scratch(&format!("{}-{}", binary, args.join("_")));
    let config_path = dir.join("tiny.yaml");
    std::fs::write(&config_path, common::tiny_config(dir.join("run")).to_yaml()).unwrap();
    let output = Command::new(binary)
        .arg("--config")
        .arg(&config_path)
        .args(["--device", "cpu"])
        .args(args)
        .env("RUST_BACKTRACE", "1")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr).to_string();
    assert!(!output.status.success(), "{binary} {args:?} succeeded");
    assert!(
        !stderr.contains("panicked"),
        "{binary} {args:?} panicked:\n{stderr}"
    );
    // 101 is Rust's exit code for a panic in main.
    assert!(matches!(output.status.code(), Some(1 | 2)), "{stderr}");
    assert!(!stderr.to_lowercase().contains("backtrace"), "{stderr}");
    let reports = stderr
        .lines()
        .filter(|l| l.to_lowercase().starts_with("error: ") || l.contains("ERROR"));
    assert_eq!(reports.count(), 1, "{stderr}");
    stderr
}

const EVAL: &str = env!("CARGO_BIN_EXE_svf-eval");
const BENCH: &str = env!("CARGO_BIN_EXE_svf-bench");

#[test]
fn eval_flags_are_validated_like_config_keys() {
    let weights = ["--weights", "does-not-matter.safetensors"];
    let stderr = fails_cleanly(EVAL, &[&weights[..], &["--shot", "0"]].concat());
    assert!(
        stderr.contains("`shot`") && stderr.contains("at least 1"),
        "{stderr}"
    );
    let stderr = fails_cleanly(EVAL, &[&weights[..], &["--workers", "0"]].concat());
    assert!(stderr.contains("`workers`"), "{stderr}");
    // Zero episodes would report an mIoU of 0 for a run that measured nothing.
    let stderr = fails_cleanly(EVAL, &[&weights[..], &["--episodes", "0"]].concat());
    assert!(stderr.contains("--episodes"), "{stderr}");
}

#[test]
fn bench_sizes_and_shots_are_validated_like_config_keys() {
    let stderr = fails_cleanly(BENCH, &["--what", "eval", "--size", "64"]);
    assert!(
        stderr.contains("`train_h`") && stderr.contains("64") && stderr.contains("--size"),
        "{stderr}"
    );
    let stderr = fails_cleanly(BENCH, &["--what", "train", "--shot", "0"]);
    assert!(stderr.contains("`shot`"), "{stderr}");
    let stderr = fails_cleanly(BENCH, &["--repeats", "0"]);
    assert!(stderr.contains("--repeats"), "{stderr}");
}

/// An error of a started run is logged once, without a backtrace, and also in the run
/// directory's log.txt, where the reason a run stopped is looked for.
#[test]
fn train_error_is_reported_once_and_kept_in_the_run_log() {
    let dir = common::scratch("train-error-logged");
    let config_path = dir.join("tiny.yaml");
    let config = svf::config::Config {
        base_lr: 1e8,
        train_episodes: Some(8),
        batch_size: 2,
        ..common::tiny_config(dir.join("run"))
    };
    std::fs::write(&config_path, config.to_yaml()).unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_svf-train"))
        .arg("--config")
        .arg(&config_path)
        .args(["--device", "cpu"])
        .env("RUST_BACKTRACE", "1")
        .env("OMP_NUM_THREADS", "1")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert_eq!(stderr.matches("loss is").count(), 1, "{stderr}");
    assert!(!stderr.to_lowercase().contains("backtrace"), "{stderr}");
    let log = std::fs::read_to_string(dir.join("run/log.txt")).unwrap();
    assert!(log.contains("ERROR") && log.contains("loss is"), "{log}");
}

/// A start that fails on its data creates no run directory; one refused because another
/// svf-train holds the directory names that process and leaves the directory's log.txt alone.
#[test]
fn failed_or_refused_train_start_leaves_the_run_directory_alone() {
    let dir = common::scratch("train-refused");
    let run = dir.join("run");
    let config_path = dir.join("tiny.yaml");
    // 60 images over 20 classes: no class has 30 images for a 30-shot episode.
    let config = svf::config::Config {
        shot: 30,
        ..common::tiny_config(run.clone())
    };
    std::fs::write(&config_path, config.to_yaml()).unwrap();
    let train = |config_path: &std::path::Path| {
        Command::new(env!("CARGO_BIN_EXE_svf-train"))
            .arg("--config")
            .arg(config_path)
            .args(["--device", "cpu"])
            .output()
            .unwrap()
    };
    let output = train(&config_path);
    assert_eq!(output.status.code(), Some(1));
    assert!(!run.exists(), "{}", String::from_utf8_lossy(&output.stderr));

    std::fs::write(&config_path, common::tiny_config(run.clone()).to_yaml()).unwrap();
    std::fs::create_dir_all(&run).unwrap();
    std::fs::write(run.join("log.txt"), "the other run's log\n").unwrap();
    let _held = svf::train::lock_run_dir(&run).unwrap();
    let output = train(&config_path);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "run directory {} is in use by another svf-train (pid {}); wait for it or choose another save_path",
            run.display(),
            std::process::id()
        )),
        "{stderr}"
    );
    let log = std::fs::read_to_string(run.join("log.txt")).unwrap();
    assert_eq!(log, "the other run's log\n");
}
