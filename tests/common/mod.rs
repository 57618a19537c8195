//! Scaffolding shared by the integration tests: scratch folders, the synthetic dataset and the
//! test-sized model config.
// Every test binary compiles this module and uses a part of it.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, OnceLock};

use svf::config::Config;
use svf::data::synth::{write_dataset, SynthOptions};

/// An empty folder `name` of this test binary, under cargo's temporary directory for tests.
pub fn scratch(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(env!("CARGO_CRATE_NAME"))
        .join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Writes the tests' synthetic dataset into `dir`: 60 train and 60 val images of 112 pixels, 20
/// classes.
pub fn write_synthetic_dataset(dir: &Path) {
    let options = SynthOptions {
        train_images: 60,
        val_images: 60,
        size: 112,
        seed: 7,
    };
    write_dataset(dir, &options).unwrap();
}

/// The synthetic dataset of this test binary ([`write_synthetic_dataset`]), written on first use.
pub fn synthetic_dataset() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = scratch("synth");
        write_synthetic_dataset(&dir);
        dir
    })
}

/// The test-sized model on [`synthetic_dataset`]: ResNet-18 at width 1/4, 65×65 inputs (9×9
/// feature maps), reduce_dim 16, bins 8 and 4, no validation; runs go to `save_path`.
pub fn tiny_config(save_path: PathBuf) -> Config {
    let data = synthetic_dataset();
    Config {
        data_root: data.to_path_buf(),
        train_list: data.join("lists/train.txt"),
        val_list: data.join("lists/val.txt"),
        train_h: 65,
        train_w: 65,
        val_size: 65,
        workers: 2,
        layers: 18,
        backbone_width: 0.25,
        reduce_dim: 16,
        ppm_scales: vec![8, 4],
        val_freq: 0,
        save_path,
        ..Config::default()
    }
}

/// The python of the venv whose torch `.libtorch` links to (scripts/setup-libtorch.sh installs it
/// as `<venv>/lib/python3.X/site-packages/torch`, wherever `SVF_CACHE_DIR` or `HOME` put it), or
/// `SVF_TEST_PYTHON`. The PyTorch and OpenCV cross-checks need it: without it they fail, since a
/// cross-check that skips checks nothing.
pub fn venv_python() -> PathBuf {
    if let Some(python) = std::env::var_os("SVF_TEST_PYTHON") {
        return PathBuf::from(python);
    }
    let torch = Path::new(env!("CARGO_MANIFEST_DIR")).join(".libtorch");
    torch
        .canonicalize()
        .ok()
        .and_then(|t| Some(t.ancestors().nth(4)?.join("bin/python")))
        .filter(|python| python.exists())
        .unwrap_or_else(|| {
            panic!(
                "the cross-checks need the python of the venv that scripts/setup-libtorch.sh \
                 installs ({} is not its torch): run scripts/test.sh, or set SVF_TEST_PYTHON to a \
                 python with torch, safetensors and opencv-python-headless",
                torch.display()
            )
        })
}

/// Runs `script` with [`venv_python`] and `args`, failing the test with its stderr on an error.
pub fn run_python(script: &str, args: &[&Path]) -> std::process::Output {
    let mut command = std::process::Command::new(venv_python());
    command.arg("-c").arg(script).args(args);
    run_ok(&mut command)
}

/// [`venv_python`] with `modules` importable, for cross-checks against reference tools. A
/// missing tool fails the test (a cross-check that skips proves nothing): scripts/test.sh installs
/// them.
pub fn python_with(modules: &[&str]) -> PathBuf {
    let python = venv_python();
    let imports = format!("import {}", modules.join(", "));
    let status = std::process::Command::new(&python)
        .args(["-c", &imports])
        .status()
        .unwrap();
    assert!(
        status.success(),
        "{} cannot `{imports}`: run scripts/test.sh, which installs them into the venv",
        python.display()
    );
    python
}

/// Runs `command` to completion and returns its output, failing the test with the command's
/// stderr when it exits unsuccessfully.
pub fn run_ok(command: &mut std::process::Command) -> std::process::Output {
    let output = command.output().unwrap();
    assert!(
        output.status.success(),
        "{command:?} failed:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

/// libtorch's generator is process-global: tests that initialise or train a model in this process
/// take turns, so that each sees exactly the random numbers its seeds ask for. One intra-op thread
/// each: on a shared 2-core machine, OpenMP's spinning threads slow tiny models down twentyfold.
pub fn exclusive_torch() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    let guard = LOCK.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    tch::set_num_threads(1);
    guard
}
