//! BAM's stages end to end on the synthetic dataset on the CPU: the base stage (PSPNet on whole
//! images, base-class labels) learns the base classes, and its checkpoint records the fold.

mod common;

use svf::checkpoint;
use svf::config::Config;
use svf::data::segmentation::SegmentationDataset;
use svf::data::Split;
use svf::train::base::{base_miou, train_base, BaseLearnerMeta, BASE_BEST, BASE_LAST};
use tch::Device;

fn base_config(name: &str, seed: u64) -> Config {
    Config {
        manual_seed: seed,
        epochs: 6,
        batch_size: 4,
        base_lr: 0.01,
        head_lr_scale: 1.0,
        lr_schedule: svf::config::LrScheduleKind::Constant,
        val_freq: 6,
        batch_size_val: 8,
        print_freq: 1000,
        ..common::tiny_config(common::scratch(name))
    }
}

#[test]
fn base_stage_learns_the_base_classes_and_records_the_fold() {
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
    assert!(best > before + 0.05, "untrained {before}, trained {best}");
}
