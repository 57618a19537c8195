//! The experiment configuration: one flat YAML file per run with PFENet's key names, typed, with
//! PFENet's PASCAL defaults, validated once at start-up. `--set key=value` overrides any key.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Why a configuration could not be used. Every variant names the file or key and what to do.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}; check the path given to --config")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("--set {arg}: {message}")]
    Override { arg: String, message: String },
    #[error("config key `{key}` ({source_name}): {message}")]
    Invalid {
        key: &'static str,
        source_name: String,
        message: String,
    },
}

/// Mixed-precision mode for CUDA runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Amp {
    /// Full float32 everywhere (the reference).
    #[default]
    None,
    /// bfloat16 autocast on CUDA; ignored on CPU.
    Bf16,
}

/// Which training images a fold keeps (validation always keeps PFENet's rule).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum TrainFilter {
    /// PFENet: an image with at least one training class of at least 2048 pixels; novel classes
    /// may appear in it (as background).
    #[default]
    Pfenet,
    /// BAM's "filter intersection" (the SVF paper's rows, REFERENCE §8): additionally, every
    /// class of the label (any size) must be a training class, so novel objects never appear.
    Bam,
}

/// How the base learning rate moves over a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum LrScheduleKind {
    /// PFENet's `base_lr · (1 − iter/max_iter)^power`.
    #[default]
    Poly,
    /// `base_lr` throughout: what the SVF authors' per-iteration cosine scheduler amounts to
    /// (it stays within 3e-5 of its start over a whole run, REFERENCE §8).
    Constant,
}

/// Where layer3 and layer4 of a ResNet dilate instead of downsampling (output stride 8 either way).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum DilationPattern {
    /// PFENet's loop: every block of layer3 dilation 2, of layer4 dilation 4.
    #[default]
    Pfenet,
    /// torchvision's `replace_stride_with_dilation`, which the SVF authors' backbone uses: the
    /// first block of a stage keeps the previous stage's dilation (layer3: 1, layer4: 2), the
    /// others get the stage's (2, 4).
    Torchvision,
}

/// Which few-shot model a run trains and evaluates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Method {
    /// PFENet (+ SVF with `svf: true`).
    #[default]
    Pfenet,
    /// BAM: a PSPNet base learner (stage `base`) and a meta learner with the ensemble (stage
    /// `meta`); + SVF with `svf: true` (the paper's best rows).
    Bam,
}

/// Which of BAM's two training stages a `method: bam` run is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Stage {
    /// The few-shot model (PFENet, or BAM's meta learner on a trained base learner).
    #[default]
    Meta,
    /// BAM's first stage: the PSPNet base learner, supervised on the fold's base classes.
    Base,
}

/// Every key of a run. Field names are PFENet's where PFENet has the key.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    // --- data ---
    /// Dataset root; list entries are relative to it.
    pub data_root: PathBuf,
    /// Training list: `JPEGImages/x.jpg SegmentationClassAug/x.png` per line (PFENet's lists and
    /// BAM's `data_list_{fold}.txt`), or BAM's `sub_class_file_list_{fold}.txt`.
    pub train_list: PathBuf,
    /// Validation list, same formats.
    pub val_list: PathBuf,
    /// Which training images are kept: `pfenet` or `bam` (the paper's rows).
    pub train_filter: TrainFilter,
    /// COCO-20i instead of PASCAL-5i.
    pub use_coco: bool,
    /// COCO fold scheme i+1, i+5, ..., i+77 (true) or 20i+1..20i+20 (false).
    pub use_split_coco: bool,
    /// Fold index, 0..=3.
    pub split: usize,
    /// Support images per episode (K).
    pub shot: usize,
    /// Training crop height; `(train_h - 1) % 8 == 0`.
    pub train_h: i64,
    /// Training crop width; `(train_w - 1) % 8 == 0`.
    pub train_w: i64,
    /// Validation canvas size; `(val_size - 1) % 8 == 0`.
    pub val_size: i64,
    pub scale_min: f64,
    pub scale_max: f64,
    /// Rotation range in degrees.
    pub rotate_min: f64,
    pub rotate_max: f64,
    /// Loader worker threads.
    pub workers: usize,
    /// Training episodes per epoch; `null` = one per query image of the train list (the reference).
    pub train_episodes: Option<usize>,
    /// Validation episodes during training.
    pub val_episodes: usize,
    /// Compare predictions with the original-size label (the reference's `ori_resize`).
    pub ori_resize: bool,

    // --- model ---
    /// `pfenet` or `bam`.
    pub method: Method,
    /// `meta` (the few-shot model) or `base` (BAM's base learner; `method: bam` only).
    pub stage: Stage,
    /// BAM's meta stage: the trained base learner, a base-stage run directory (its `best`
    /// checkpoint, else `last`) or a weights file (e.g. BAM's released one, converted).
    pub base_learner: Option<PathBuf>,
    /// ResNet depth: 18 or 34 (basic blocks, for tests and the CPU demo), 50 or 101 (PSPNet v2).
    pub layers: usize,
    /// VGG16-BN backbone instead of ResNet.
    pub vgg: bool,
    /// Channel width multiplier of the backbone (1.0 = the standard widths; smaller for tests).
    pub backbone_width: f64,
    /// ResNet layer3/layer4 dilation: `pfenet` or `torchvision` (the SVF authors'). No effect on VGG,
    /// which has no dilated stages.
    pub dilation: DilationPattern,
    /// Pretrained full-rank backbone weights (safetensors, PSPNet or PFENet names); `null` = random.
    pub backbone_weights: Option<PathBuf>,
    /// Whole-model weights to start from (safetensors), e.g. a previous run's checkpoint.
    pub weight: Option<PathBuf>,
    /// Head width (PFENet's `reduce_dim`).
    pub reduce_dim: i64,
    /// Pyramid bins of the PFENet head.
    pub ppm_scales: Vec<i64>,

    // --- SVF ---
    /// Decompose layer0..layer4 by SVD and train only `vector_S` of layer2..layer4.
    pub svf: bool,
    pub svf_rank_ratio: f64,
    /// Rank rounded down to a multiple of this (4 = the reference; 1 = exact decomposition).
    pub svf_rank_multiple: usize,
    pub svf_skip_1x1: bool,
    pub svf_skip_3x3: bool,
    /// Parameter-name prefixes of convolutions left full-rank (e.g. `layer0.0`).
    pub svf_exclude: Vec<String>,
    /// Rank ratio per parameter-name prefix (`{layer4: 0.5}`), overriding `svf_rank_ratio`; the
    /// longest matching prefix wins.
    pub svf_layer_ratios: std::collections::BTreeMap<String, f64>,
    /// Keep backbone BatchNorm in eval mode (BAM); `false` reproduces PFENet's drifting statistics.
    pub fix_bn: bool,

    // --- optimisation ---
    pub batch_size: usize,
    pub batch_size_val: usize,
    pub base_lr: f64,
    /// LR multiplier of the head's parameters (PFENet's 10x; the SVF paper's 1).
    pub head_lr_scale: f64,
    /// LR multiplier of the trained backbone parameters (`vector_S`; the SVF paper's 1/10).
    pub backbone_lr_scale: f64,
    /// `poly` (PFENet) or `constant` (the SVF paper).
    pub lr_schedule: LrScheduleKind,
    pub epochs: usize,
    /// Poly schedule exponent.
    pub power: f64,
    pub momentum: f64,
    pub weight_decay: f64,
    /// Linear warm-up iterations from 0.1 * base_lr; 0 = none.
    pub warmup_steps: usize,
    pub aux_weight: f64,
    pub manual_seed: u64,
    /// Mixed precision on CUDA.
    pub amp: Amp,

    // --- run ---
    /// Run directory: config, log, metrics, checkpoints.
    pub save_path: PathBuf,
    /// Log every this many iterations.
    pub print_freq: usize,
    /// Write the `last` checkpoint every this many iterations.
    pub save_freq: usize,
    /// Validate every this many epochs (0 = never).
    pub val_freq: usize,
    /// Also validate in the middle of every epoch (the reference does when epochs <= 100: COCO).
    pub val_half_epoch: bool,
    /// Stop after this many epochs without a new best validation mIoU (0 = never; the paper: 75).
    pub stop_interval: usize,
}

impl Default for Config {
    /// PFENet's PASCAL-5i split-0 ResNet-50 configuration, with SVF off.
    fn default() -> Self {
        Config {
            data_root: PathBuf::from("data/VOCdevkit2012/VOC2012"),
            train_list: PathBuf::from("data/lists/pascal/voc_sbd_merge_noduplicate.txt"),
            val_list: PathBuf::from("data/lists/pascal/val.txt"),
            train_filter: TrainFilter::Pfenet,
            use_coco: false,
            use_split_coco: false,
            split: 0,
            shot: 1,
            train_h: 473,
            train_w: 473,
            val_size: 473,
            scale_min: 0.9,
            scale_max: 1.1,
            rotate_min: -10.0,
            rotate_max: 10.0,
            workers: 2,
            train_episodes: None,
            val_episodes: 1000,
            ori_resize: true,
            method: Method::Pfenet,
            stage: Stage::Meta,
            base_learner: None,
            layers: 50,
            vgg: false,
            backbone_width: 1.0,
            dilation: DilationPattern::Pfenet,
            backbone_weights: None,
            weight: None,
            reduce_dim: 256,
            ppm_scales: vec![60, 30, 15, 8],
            svf: false,
            svf_rank_ratio: 1.0,
            svf_rank_multiple: 4,
            svf_skip_1x1: false,
            svf_skip_3x3: false,
            svf_exclude: Vec::new(),
            svf_layer_ratios: Default::default(),
            fix_bn: true,
            batch_size: 4,
            batch_size_val: 1,
            base_lr: 0.0025,
            head_lr_scale: 10.0,
            backbone_lr_scale: 1.0,
            lr_schedule: LrScheduleKind::Poly,
            epochs: 200,
            power: 0.9,
            momentum: 0.9,
            weight_decay: 1e-4,
            warmup_steps: 0,
            aux_weight: 1.0,
            manual_seed: 321,
            amp: Amp::None,
            save_path: PathBuf::from("runs/pascal_split0"),
            print_freq: 5,
            save_freq: 200,
            val_freq: 1,
            val_half_epoch: false,
            stop_interval: 0,
        }
    }
}

impl Config {
    /// Reads `path` (and the files its `base` key names), applies `overrides` (`key=value`, value
    /// in YAML syntax) and validates.
    pub fn load(path: &Path, overrides: &[String]) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_yaml_str(&text, path, overrides)
    }

    /// Like [`Config::load`] on text already read; `origin` names the text in messages, and a
    /// `base` key in it is resolved relative to `origin`'s folder.
    pub fn from_yaml_str(
        text: &str,
        origin: &Path,
        overrides: &[String],
    ) -> Result<Config, ConfigError> {
        let mut map = merged_mapping(text, origin, &mut Vec::new())?;
        // Unknown keys and wrong types were reported per file; what remains is the merged whole.
        let from_file: Config = serde_yaml::from_value(serde_yaml::Value::Mapping(map.clone()))
            .map_err(|e| ConfigError::Parse {
                path: origin.to_path_buf(),
                message: e.to_string(),
            })?;
        if overrides.is_empty() {
            from_file.validate(&origin.display().to_string())?;
            return Ok(from_file);
        }
        for arg in overrides {
            let (key, value) = parse_override(arg)?;
            map.insert(serde_yaml::Value::String(key.clone()), value);
            serde_yaml::from_value::<Config>(serde_yaml::Value::Mapping(map.clone())).map_err(
                |e| ConfigError::Override {
                    arg: arg.clone(),
                    message: e.to_string(),
                },
            )?;
        }
        let config: Config = serde_yaml::from_value(serde_yaml::Value::Mapping(map))
            .expect("every override was checked above");
        config.validate(&format!("{} with command-line overrides", origin.display()))?;
        Ok(config)
    }

    /// Checks every constraint; `source_name` says where the values came from.
    pub fn validate(&self, source_name: &str) -> Result<(), ConfigError> {
        let fail = |key: &'static str, message: String| {
            Err(ConfigError::Invalid {
                key,
                source_name: source_name.to_string(),
                message,
            })
        };
        for (key, value) in [
            ("train_h", self.train_h),
            ("train_w", self.train_w),
            ("val_size", self.val_size),
        ] {
            if value < 9 || (value - 1) % 8 != 0 {
                return fail(
                    key,
                    format!("{value} must satisfy ({key} - 1) % 8 == 0 and be at least 9, e.g. 473 or 233"),
                );
            }
        }
        if self.stage == Stage::Base && self.method != Method::Bam {
            return fail(
                "stage",
                "`base` trains BAM's base learner and needs method: bam; PFENet has one stage (stage: meta)".into(),
            );
        }
        if self.split > 3 {
            return fail("split", format!("{} must be in 0..=3", self.split));
        }
        if self.shot < 1 {
            return fail("shot", "must be at least 1".into());
        }
        if !(self.scale_min > 0.0 && self.scale_min <= self.scale_max) {
            return fail(
                "scale_min",
                format!(
                    "must satisfy 0 < scale_min <= scale_max (got {} and {})",
                    self.scale_min, self.scale_max
                ),
            );
        }
        if self.rotate_min > self.rotate_max {
            return fail(
                "rotate_min",
                format!(
                    "must be <= rotate_max (got {} and {})",
                    self.rotate_min, self.rotate_max
                ),
            );
        }
        if self.workers < 1 {
            return fail("workers", "must be at least 1".into());
        }
        if self.train_episodes == Some(0) {
            return fail(
                "train_episodes",
                "must be at least 1, or null for one per image".into(),
            );
        }
        if self.val_episodes < 1 {
            return fail("val_episodes", "must be at least 1".into());
        }
        if !self.vgg && ![18, 34, 50, 101].contains(&self.layers) {
            return fail(
                "layers",
                format!("{} must be one of 18, 34, 50, 101", self.layers),
            );
        }
        if !(self.backbone_width > 0.0 && self.backbone_width <= 1.0) {
            return fail(
                "backbone_width",
                format!("{} must be in (0, 1]", self.backbone_width),
            );
        }
        if self.reduce_dim < 1 {
            return fail("reduce_dim", "must be at least 1".into());
        }
        if self.ppm_scales.is_empty() || self.ppm_scales.iter().any(|&s| s < 1) {
            return fail(
                "ppm_scales",
                "must be a non-empty list of positive bin sizes, e.g. [60, 30, 15, 8]".into(),
            );
        }
        if let Some((prefix, ratio)) = self
            .svf_layer_ratios
            .iter()
            .find(|(_, r)| !(**r > 0.0 && **r <= 1.0))
        {
            return fail(
                "svf_layer_ratios",
                format!("the ratio {ratio} of `{prefix}` must be in (0, 1]"),
            );
        }
        if !(self.svf_rank_ratio > 0.0 && self.svf_rank_ratio <= 1.0) {
            return fail(
                "svf_rank_ratio",
                format!("{} must be in (0, 1]", self.svf_rank_ratio),
            );
        }
        if self.svf_rank_multiple < 1 {
            return fail(
                "svf_rank_multiple",
                "must be at least 1 (4 = the reference, 1 = exact)".into(),
            );
        }
        if self.batch_size < 1 {
            return fail("batch_size", "must be at least 1".into());
        }
        if self.batch_size_val < 1 {
            return fail("batch_size_val", "must be at least 1".into());
        }
        if !(self.base_lr > 0.0 && self.base_lr.is_finite()) {
            return fail("base_lr", format!("{} must be positive", self.base_lr));
        }
        if !(self.head_lr_scale > 0.0 && self.head_lr_scale.is_finite()) {
            return fail(
                "head_lr_scale",
                format!("{} must be positive", self.head_lr_scale),
            );
        }
        if !(self.backbone_lr_scale > 0.0 && self.backbone_lr_scale.is_finite()) {
            return fail(
                "backbone_lr_scale",
                format!("{} must be positive", self.backbone_lr_scale),
            );
        }
        if self.lr_schedule == LrScheduleKind::Constant && self.warmup_steps > 0 {
            return fail(
                "lr_schedule",
                format!(
                    "`constant` conflicts with warmup_steps {}: a warm-up ramps the rate, so set warmup_steps: 0 or lr_schedule: poly",
                    self.warmup_steps
                ),
            );
        }
        if self.epochs < 1 {
            return fail("epochs", "must be at least 1".into());
        }
        if self.power.is_nan() || self.power < 0.0 {
            return fail("power", format!("{} must be >= 0", self.power));
        }
        if !(0.0..1.0).contains(&self.momentum) {
            return fail("momentum", format!("{} must be in [0, 1)", self.momentum));
        }
        if self.weight_decay.is_nan() || self.weight_decay < 0.0 {
            return fail(
                "weight_decay",
                format!("{} must be >= 0", self.weight_decay),
            );
        }
        if self.aux_weight.is_nan() || self.aux_weight < 0.0 {
            return fail("aux_weight", format!("{} must be >= 0", self.aux_weight));
        }
        if self.print_freq < 1 {
            return fail("print_freq", "must be at least 1".into());
        }
        if self.save_freq < 1 {
            return fail("save_freq", "must be at least 1".into());
        }
        if self.stop_interval > 0 && self.val_freq == 0 {
            return fail(
                "stop_interval",
                format!(
                    "{} needs validation to measure improvement, but val_freq is 0; set val_freq (e.g. 1) or stop_interval: 0",
                    self.stop_interval
                ),
            );
        }
        if self.val_half_epoch && self.val_freq == 0 {
            return fail(
                "val_half_epoch",
                "true needs validation, but val_freq is 0; set val_freq (e.g. 1) or val_half_epoch: false".into(),
            );
        }
        Ok(())
    }

    /// Number of classes of the dataset (20 for PASCAL, 80 for COCO).
    pub fn dataset_classes(&self) -> usize {
        if self.use_coco {
            80
        } else {
            20
        }
    }

    /// The config as YAML, as written into a run directory.
    pub fn to_yaml(&self) -> String {
        serde_yaml::to_string(self).expect("a Config always serialises")
    }
}

/// The keys a resumed run may change: they extend the run (`epochs`, `stop_interval`), or only say
/// how often it logs and saves and how many threads load its episodes (each episode is a pure
/// function of (seed, index)), or where its directory now is (`save_path`). None of them changes
/// the weights of an iteration. Every other key, validation's included (it picks `best`), is
/// recorded by the checkpoints and must stay as it was ([`ConfigRecord`]).
pub const RESUMABLE_KEYS: &[&str] = &[
    "epochs",
    "stop_interval",
    "print_freq",
    "save_freq",
    "workers",
    "save_path",
];

/// The keys of a config that decide what a run learns (all but [`RESUMABLE_KEYS`]), as a
/// checkpoint records them: `svf-train --resume` refuses a config.yaml
/// edited since, which would otherwise continue the weights on other data or another recipe and
/// then describe them wrongly (e.g. another fold, whose novel classes the run has learned).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ConfigRecord(serde_json::Map<String, serde_json::Value>);

/// A recorded key whose value the current config changes.
#[derive(Debug, Clone, PartialEq)]
pub struct KeyChange {
    pub key: String,
    /// The values in YAML flow syntax (what a config.yaml line takes).
    pub recorded: String,
    pub now: String,
}

impl ConfigRecord {
    /// What `config`'s checkpoints record.
    pub fn of(config: &Config) -> ConfigRecord {
        let serde_json::Value::Object(mut keys) =
            serde_json::to_value(config).expect("a Config always serialises")
        else {
            unreachable!("a Config serialises as a mapping")
        };
        keys.retain(|key, _| !RESUMABLE_KEYS.contains(&key.as_str()));
        ConfigRecord(keys)
    }

    /// The recorded config, keys it lacks at their defaults (the resumable keys among them).
    pub fn to_config(&self) -> Result<Config, String> {
        serde_json::from_value(serde_json::Value::Object(self.0.clone()))
            .map_err(|e| format!("the recorded config is unreadable: {e}"))
    }

    /// The recorded keys that `config` changes, in alphabetical order. A key the record lacks
    /// (written before the key existed) counts as its default, as in a config file; `Err` when the
    /// record holds a key or value this version does not know.
    pub fn changes_to(&self, config: &Config) -> Result<Vec<KeyChange>, String> {
        let recorded = self.to_config()?;
        let (recorded, now) = (ConfigRecord::of(&recorded), ConfigRecord::of(config));
        Ok(now
            .0
            .iter()
            .filter(|(key, value)| recorded.0.get(*key) != Some(*value))
            .map(|(key, value)| KeyChange {
                key: key.clone(),
                recorded: recorded.0.get(key).map_or("null".into(), |v| v.to_string()),
                now: value.to_string(),
            })
            .collect())
    }
}

/// The key naming the file a config file builds on, relative to its own folder.
pub const BASE_KEY: &str = "base";

/// The `key: value` mapping of `text` (from `origin`) over the mappings of its `base` chain: the
/// file's own keys replace its base's. `chain` holds the files being read, to reject cycles. Each
/// file's own keys are checked against [`Config`] here, so an error names the file that has it.
fn merged_mapping(
    text: &str,
    origin: &Path,
    chain: &mut Vec<PathBuf>,
) -> Result<serde_yaml::Mapping, ConfigError> {
    let parse_err = |message: String| ConfigError::Parse {
        path: origin.to_path_buf(),
        message,
    };
    let mut map = match serde_yaml::from_str::<serde_yaml::Value>(text)
        .map_err(|e| parse_err(e.to_string()))?
    {
        serde_yaml::Value::Mapping(m) => m,
        serde_yaml::Value::Null => serde_yaml::Mapping::new(),
        _ => return Err(parse_err("expected a mapping of `key: value` lines".into())),
    };
    let base = match map.remove(BASE_KEY) {
        None => None,
        Some(serde_yaml::Value::String(base)) => Some(base),
        Some(_) => {
            return Err(parse_err(format!(
                "key `{BASE_KEY}`: expected the path of another config file, relative to this one (e.g. `base: ../pascal_base.yaml`)"
            )))
        }
    };
    serde_yaml::from_value::<Config>(serde_yaml::Value::Mapping(map.clone())).map_err(|e| {
        parse_err(format!(
            "{}{e}; see configs/pascal_split0.yaml for every key",
            culprit_key(&map)
                .map(|k| format!("key `{k}`: "))
                .unwrap_or_default()
        ))
    })?;
    let Some(base) = base else {
        return Ok(map);
    };
    let base_path = origin.parent().unwrap_or(Path::new("")).join(&base);
    let identity = |path: &Path| std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    if chain.is_empty() {
        chain.push(identity(origin));
    }
    let base_id = identity(&base_path);
    if chain.contains(&base_id) {
        return Err(parse_err(format!(
            "key `{BASE_KEY}`: {} is already being read ({}); remove the cycle",
            base_path.display(),
            chain
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(" -> ")
        )));
    }
    let base_text = std::fs::read_to_string(&base_path).map_err(|e| {
        parse_err(format!(
            "key `{BASE_KEY}`: cannot read {}: {e}; the path is relative to this file's folder",
            base_path.display()
        ))
    })?;
    chain.push(base_id);
    let mut merged = merged_mapping(&base_text, &base_path, chain)?;
    chain.pop();
    for (key, value) in map {
        merged.insert(key, value);
    }
    Ok(merged)
}

/// The first key whose value alone fails to deserialise: serde_yaml's type errors do not name it.
fn culprit_key(map: &serde_yaml::Mapping) -> Option<String> {
    map.iter().find_map(|(key, value)| {
        let mut single = serde_yaml::Mapping::new();
        single.insert(key.clone(), value.clone());
        serde_yaml::from_value::<Config>(serde_yaml::Value::Mapping(single))
            .is_err()
            .then(|| match key {
                serde_yaml::Value::String(s) => s.clone(),
                other => format!("{other:?}"),
            })
    })
}

/// Splits `key=value` and parses the value as YAML (`shot=5`, `ppm_scales=[30,15]`, `weight=null`).
fn parse_override(arg: &str) -> Result<(String, serde_yaml::Value), ConfigError> {
    let Some((key, value)) = arg.split_once('=') else {
        return Err(ConfigError::Override {
            arg: arg.to_string(),
            message: "expected key=value, e.g. --set shot=5".into(),
        });
    };
    let key = key.trim();
    if key.is_empty() {
        return Err(ConfigError::Override {
            arg: arg.to_string(),
            message: "the key is empty; expected key=value".into(),
        });
    }
    if value.trim().is_empty() {
        if let Some(message) = empty_value_message(key) {
            return Err(ConfigError::Override {
                arg: arg.to_string(),
                message,
            });
        }
    }
    let value = serde_yaml::from_str(value).map_err(|e| ConfigError::Override {
        arg: arg.to_string(),
        message: format!("the value is not valid YAML: {e}"),
    })?;
    Ok((key.to_string(), value))
}

/// What to write instead of an empty value for `key` (YAML reads nothing as null, which would
/// either clear a nullable key unasked or fail as a "unit value"); `None` for an unknown key, left
/// to the unknown-field error.
fn empty_value_message(key: &str) -> Option<String> {
    let as_yaml =
        |config: Config| serde_yaml::to_value(config).expect("a Config always serialises");
    let mut single = serde_yaml::Mapping::new();
    single.insert(key.into(), serde_yaml::Value::Null);
    // serde_yaml also reads null as an empty list: nullable means null survives the round trip.
    let nullable = serde_yaml::from_value::<Config>(serde_yaml::Value::Mapping(single))
        .is_ok_and(|config| as_yaml(config).get(key) == Some(&serde_yaml::Value::Null));
    if nullable {
        return Some(format!(
            "the value is empty; give one, or write `--set {key}=null` for none"
        ));
    }
    let defaults = as_yaml(Config::default());
    let default = defaults.get(key)?;
    let example = serde_yaml::to_string(default)
        .ok()
        .map(|text| text.trim().to_string())
        .filter(|text| !text.contains('\n'))
        .map(|text| format!(", e.g. `--set {key}={text}` (its default)"))
        .unwrap_or_default();
    Some(format!(
        "the value is empty; `{key}` needs a value{example}"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(text: &str, overrides: &[&str]) -> Result<Config, ConfigError> {
        let overrides: Vec<String> = overrides.iter().map(|s| s.to_string()).collect();
        Config::from_yaml_str(text, Path::new("test.yaml"), &overrides)
    }

    /// Asserts that `text` fails validation on `key` and the message names the key.
    fn assert_invalid(text: &str, key: &str) {
        let err = load(text, &[]).expect_err(text);
        let message = err.to_string();
        assert!(
            matches!(&err, ConfigError::Invalid { key: k, .. } if *k == key),
            "{text}: {message}"
        );
        assert!(message.contains(key), "{message}");
        assert!(message.contains("test.yaml"), "{message}");
    }

    #[test]
    fn empty_file_gives_pfenet_pascal_defaults() {
        let config = load("", &[]).unwrap();
        assert_eq!(config, Config::default());
        assert_eq!(config.train_h, 473);
        assert_eq!(config.base_lr, 0.0025);
        assert_eq!(config.ppm_scales, vec![60, 30, 15, 8]);
        assert_eq!(config.manual_seed, 321);
    }

    #[test]
    fn shipped_configs_parse_and_validate() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("configs");
        let mut seen = 0;
        for dir in [root.clone(), root.join("paper")] {
            for entry in std::fs::read_dir(&dir).unwrap() {
                let path = entry.unwrap().path();
                if path.extension().is_some_and(|e| e == "yaml") {
                    Config::load(&path, &[]).unwrap_or_else(|e| panic!("{e}"));
                    seen += 1;
                }
            }
        }
        assert!(seen >= 9 + 32, "{seen} configs");
    }

    #[test]
    fn unknown_key_names_key_and_file() {
        let message = load("shots: 5\n", &[]).unwrap_err().to_string();
        assert!(message.contains("shots"), "{message}");
        assert!(message.contains("test.yaml"), "{message}");
    }

    #[test]
    fn wrong_type_names_key() {
        let message = load("shot: five\n", &[]).unwrap_err().to_string();
        assert!(message.contains("shot"), "{message}");
    }

    #[test]
    fn each_rule_names_its_key() {
        assert_invalid("train_h: 472", "train_h");
        assert_invalid("train_w: 100", "train_w");
        assert_invalid("val_size: 474", "val_size");
        assert_invalid("split: 4", "split");
        assert_invalid("shot: 0", "shot");
        assert_invalid("scale_min: 1.2", "scale_min");
        assert_invalid("rotate_min: 20", "rotate_min");
        assert_invalid("workers: 0", "workers");
        assert_invalid("train_episodes: 0", "train_episodes");
        assert_invalid("val_episodes: 0", "val_episodes");
        assert_invalid("layers: 152", "layers");
        assert_invalid("backbone_width: 0", "backbone_width");
        assert_invalid("reduce_dim: 0", "reduce_dim");
        assert_invalid("ppm_scales: []", "ppm_scales");
        assert_invalid("svf_rank_ratio: 1.5", "svf_rank_ratio");
        assert_invalid("svf_layer_ratios: {layer4: 1.5}", "svf_layer_ratios");
        assert_invalid("svf_rank_multiple: 0", "svf_rank_multiple");
        assert_invalid("batch_size: 0", "batch_size");
        assert_invalid("batch_size_val: 0", "batch_size_val");
        assert_invalid("base_lr: 0", "base_lr");
        assert_invalid("head_lr_scale: -1", "head_lr_scale");
        assert_invalid("epochs: 0", "epochs");
        assert_invalid("power: -1", "power");
        assert_invalid("momentum: 1.0", "momentum");
        assert_invalid("weight_decay: -0.1", "weight_decay");
        assert_invalid("aux_weight: -1", "aux_weight");
        assert_invalid("print_freq: 0", "print_freq");
        assert_invalid("save_freq: 0", "save_freq");
        assert_invalid("backbone_lr_scale: 0", "backbone_lr_scale");
    }

    #[test]
    fn conflicting_keys_name_both() {
        for (text, key, other) in [
            (
                "lr_schedule: constant\nwarmup_steps: 10",
                "lr_schedule",
                "warmup_steps",
            ),
            (
                "stop_interval: 75\nval_freq: 0",
                "stop_interval",
                "val_freq",
            ),
            (
                "val_half_epoch: true\nval_freq: 0",
                "val_half_epoch",
                "val_freq",
            ),
        ] {
            assert_invalid(text, key);
            let message = load(text, &[]).unwrap_err().to_string();
            assert!(message.contains(other), "{message}");
        }
        // Each alone is fine.
        load(
            "lr_schedule: constant\nstop_interval: 75\nval_half_epoch: true",
            &[],
        )
        .unwrap();
    }

    #[test]
    fn recipe_keys_parse_with_their_words() {
        let config = load(
            "train_filter: bam\ndilation: torchvision\nlr_schedule: constant\nbackbone_lr_scale: 0.1",
            &[],
        )
        .unwrap();
        assert_eq!(config.train_filter, TrainFilter::Bam);
        assert_eq!(config.dilation, DilationPattern::Torchvision);
        assert_eq!(config.lr_schedule, LrScheduleKind::Constant);
        assert_eq!(config.backbone_lr_scale, 0.1);
        let message = load("train_filter: hsnet", &[]).unwrap_err().to_string();
        assert!(message.contains("train_filter"), "{message}");
    }

    /// A scratch folder of this test module.
    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("svf-config-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn base_files_merge_key_wise_relative_to_the_file() {
        let dir = scratch("base");
        std::fs::create_dir_all(dir.join("paper")).unwrap();
        std::fs::write(
            dir.join("root.yaml"),
            "shot: 5\nbase_lr: 0.015\nepochs: 50\n",
        )
        .unwrap();
        std::fs::write(
            dir.join("paper/mid.yaml"),
            "base: ../root.yaml\nepochs: 200\nsplit: 1\n",
        )
        .unwrap();
        std::fs::write(dir.join("paper/leaf.yaml"), "base: mid.yaml\nsplit: 3\n").unwrap();
        let config = Config::load(&dir.join("paper/leaf.yaml"), &["shot=2".into()]).unwrap();
        assert_eq!(
            (config.shot, config.base_lr, config.epochs, config.split),
            (2, 0.015, 200, 3)
        );
        // The resolved config stands alone: no `base` key.
        assert!(!config.to_yaml().contains("base:"));
        // An unknown key is reported against the file that has it.
        std::fs::write(dir.join("root.yaml"), "shots: 5\n").unwrap();
        let message = Config::load(&dir.join("paper/leaf.yaml"), &[])
            .unwrap_err()
            .to_string();
        assert!(
            message.contains("root.yaml") && message.contains("shots"),
            "{message}"
        );
        // A missing base names the key and the path.
        std::fs::write(dir.join("paper/leaf.yaml"), "base: nowhere.yaml\n").unwrap();
        let message = Config::load(&dir.join("paper/leaf.yaml"), &[])
            .unwrap_err()
            .to_string();
        assert!(
            message.contains("`base`") && message.contains("nowhere.yaml"),
            "{message}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn config_record_names_changed_keys_but_not_resumable_ones() {
        let config = Config::default();
        let record = ConfigRecord::of(&config);
        let text = serde_json::to_string(&record).unwrap();
        assert!(
            !text.contains("epochs") && !text.contains("save_path"),
            "{text}"
        );
        let changed = Config {
            split: 2,
            ppm_scales: vec![8],
            epochs: 400,
            workers: 8,
            save_path: PathBuf::from("elsewhere"),
            ..config.clone()
        };
        let back: ConfigRecord = serde_json::from_str(&text).unwrap();
        let changes = back.changes_to(&changed).unwrap();
        let described: Vec<(&str, &str, &str)> = changes
            .iter()
            .map(|c| (c.key.as_str(), c.recorded.as_str(), c.now.as_str()))
            .collect();
        assert_eq!(
            described,
            [("ppm_scales", "[60,30,15,8]", "[8]"), ("split", "0", "2")]
        );
        // A key missing from an older record counts as its default.
        let mut older = record.clone();
        older.0.remove("dilation");
        assert!(older.changes_to(&config).unwrap().is_empty());
        let mut unknown = record;
        unknown.0.insert("retired_key".into(), 1.into());
        assert!(unknown.changes_to(&config).is_err());
    }

    #[test]
    fn base_cycles_are_rejected() {
        let dir = scratch("cycle");
        std::fs::write(dir.join("a.yaml"), "base: b.yaml\n").unwrap();
        std::fs::write(dir.join("b.yaml"), "base: a.yaml\n").unwrap();
        let message = Config::load(&dir.join("a.yaml"), &[])
            .unwrap_err()
            .to_string();
        assert!(message.contains("cycle"), "{message}");
        std::fs::write(dir.join("c.yaml"), "base: c.yaml\n").unwrap();
        let message = Config::load(&dir.join("c.yaml"), &[])
            .unwrap_err()
            .to_string();
        assert!(message.contains("cycle"), "{message}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn set_overrides_file_values() {
        let config = load(
            "shot: 1\nsplit: 0\n",
            &[
                "shot=5",
                "split=2",
                "ppm_scales=[30, 15]",
                "svf=true",
                "amp=bf16",
            ],
        )
        .unwrap();
        assert_eq!(config.shot, 5);
        assert_eq!(config.split, 2);
        assert_eq!(config.ppm_scales, vec![30, 15]);
        assert!(config.svf);
        assert_eq!(config.amp, Amp::Bf16);
    }

    #[test]
    fn set_errors_name_the_argument() {
        let message = load("", &["nosuchkey=1"]).unwrap_err().to_string();
        assert!(message.contains("--set nosuchkey=1"), "{message}");
        assert!(message.contains("nosuchkey"), "{message}");
        let message = load("", &["shot"]).unwrap_err().to_string();
        assert!(message.contains("key=value"), "{message}");
        let message = load("", &["train_h=100"]).unwrap_err().to_string();
        assert!(message.contains("train_h"), "{message}");
    }

    #[test]
    fn an_empty_set_value_says_what_to_write() {
        let message = load("", &["shot="]).unwrap_err().to_string();
        assert_eq!(
            message,
            "--set shot=: the value is empty; `shot` needs a value, e.g. `--set shot=1` (its default)"
        );
        let message = load("", &["ppm_scales= "]).unwrap_err().to_string();
        assert!(message.ends_with("`ppm_scales` needs a value"), "{message}");
        // A nullable key is not cleared by an empty value: null is written out.
        let message = load("backbone_weights: w.safetensors", &["backbone_weights="])
            .unwrap_err()
            .to_string();
        assert!(
            message.contains("write `--set backbone_weights=null` for none"),
            "{message}"
        );
        let config = load(
            "backbone_weights: w.safetensors",
            &["backbone_weights=null"],
        )
        .unwrap();
        assert_eq!(config.backbone_weights, None);
        let message = load("", &["nosuchkey="]).unwrap_err().to_string();
        assert!(message.contains("unknown field `nosuchkey`"), "{message}");
    }
}
