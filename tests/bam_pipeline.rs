//! BAM's stages end to end on the synthetic dataset on the CPU: the base stage (PSPNet on whole
//! images, base-class labels) writes checkpoints that record the fold, BAM+SVF's meta stage trains
//! on it, and a base learner of another fold is refused.

mod common;

use svf::checkpoint;
use svf::config::Config;
use svf::data::segmentation::SegmentationDataset;
use svf::data::Split;
use svf::train::bam::{load_meta_model, novel_miou, train_meta, BAM_LAST};
use svf::train::base::{base_miou, train_base, BaseLearnerMeta, BASE_BEST, BASE_LAST};
use tch::Device;

fn base_config(name: &str, seed: u64) -> Config {
    Config {
        manual_seed: seed,
        epochs: 2,
        batch_size: 4,
        base_lr: 0.02,
        // Validation shows whole 112-pixel images shrunk onto the 65-pixel canvas: train near that scale.
        scale_min: 0.5,
        scale_max: 0.7,
        head_lr_scale: 1.0,
        lr_schedule: svf::config::LrScheduleKind::Constant,
        val_freq: 2,
        batch_size_val: 8,
        print_freq: 1000,
        ..common::tiny_config(common::scratch(name))
    }
}

#[test]
fn base_stage_then_bam_svf_meta_stage_end_to_end() {
    let config = base_config("base-stage", 321);
    let summary = train_base(&config, Device::Cpu).unwrap();
    let best = summary.best_miou.unwrap();
    let saved = checkpoint::load::<BaseLearnerMeta>(&summary.dir, BASE_BEST).unwrap();
    assert_eq!(saved.state.fold, 0);
    assert_eq!(saved.state.dataset, "pascal");
    assert_eq!(saved.state.base_classes, (6..=20).collect::<Vec<_>>());
    assert!(checkpoint::exists(&summary.dir, BASE_LAST).unwrap());
    // A second run into the same directory is refused, not overwritten.
    assert!(train_base(&config, Device::Cpu).is_err());
    // The untrained model on the same validation images.
    tch::manual_seed(321);
    let vs = tch::nn::VarStore::new(Device::Cpu);
    let untrained =
        svf::model::pspnet::PspNet::new(&vs.root(), &config, 16, svf::backbone::Init::Random)
            .unwrap();
    let val = SegmentationDataset::open(&config, Split::Val).unwrap();
    let before = base_miou(&untrained, &val, 8, Device::Cpu).unwrap();
    eprintln!("base-class mIoU untrained {before:.4} trained {best:.4}");

    // Stage 2, BAM+SVF, on the base learner just trained.
    let meta = Config {
        svf: true,
        epochs: 1,
        train_episodes: Some(48),
        base_lr: 0.01,
        head_lr_scale: 1.0,
        backbone_lr_scale: 0.1,
        lr_schedule: svf::config::LrScheduleKind::Constant,
        batch_size_val: 8,
        print_freq: 1000,
        ..common::tiny_config(common::scratch("meta-stage"))
    };
    let (_, untrained) = load_meta_model(&meta, &summary.dir, BASE_BEST, Device::Cpu).unwrap();
    let novel_before = novel_miou(&untrained, &meta, 48, 321, Device::Cpu).unwrap();
    let run = train_meta(&meta, &summary.dir, BASE_BEST, Device::Cpu).unwrap();
    let (vs, trained) = load_meta_model(&meta, &summary.dir, BASE_BEST, Device::Cpu).unwrap();
    let last = checkpoint::load::<serde_json::Value>(&run.dir, BAM_LAST).unwrap();
    checkpoint::copy_into(&vs, &last.weights, &run.dir.join(BAM_LAST)).unwrap();
    let novel_after = novel_miou(&trained, &meta, 48, 321, Device::Cpu).unwrap();
    eprintln!("novel-class mIoU untrained {novel_before:.4} trained {novel_after:.4}");
    // Not yet a learning check: on this data the tiny base learner's base-class mIoU stays near
    // its untrained value (0.004 -> 0.007..0.06 after 6 epochs, depending on the image order),
    // and the meta stage's novel-class gain (0 -> 0.27) was the same after 3 and 4 epochs, which
    // suggests a constant prediction. Thresholds wait for a recipe that learns here.
    assert!(best.is_finite() && novel_before.is_finite() && novel_after.is_finite());
    assert!(run.iterations == 12 && run.last_loss.is_finite());

    // A base learner of another fold is refused, naming the checkpoint and the fold.
    let other_fold = Config { split: 1, ..meta };
    let message = match load_meta_model(&other_fold, &summary.dir, BASE_BEST, Device::Cpu) {
        Err(e) => e.to_string(),
        Ok(_) => panic!("fold 0's base learner loaded for fold 1"),
    };
    assert!(
        message.contains(BASE_BEST) && message.contains("fold 0"),
        "{message}"
    );
}
