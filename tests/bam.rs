//! BAM's modules against an independent PyTorch computation: the base learner's head (PSPNet's
//! `ppm` + `cls`) and BAM's meta learner, Gram adjustment, K-shot reweighting and ensemble, rebuilt
//! in PyTorch from BAM's module layout (`model/BAM.py`, `model/PSPNet.py`, `model/PPM.py`,
//! `model/ASPP.py`), loaded from our variables with `strict=True`, run on the same backbone
//! features in eval mode. (The backbone itself is checked against PyTorch in `svf_backbone.rs`.)
//! Also: the frozen base learner gets no gradient and does not change in a meta-stage step.

use std::collections::HashMap;

mod common;

use svf::backbone::Init;
use svf::config::Config;
use svf::model::bam::{self, Bam, MetaFeatures};
use tch::{nn, Device, Kind, Tensor};

const CPU_F32: (Kind, Device) = (Kind::Float, Device::Cpu);

const PYTORCH_BAM: &str = r#"
import sys
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

def up(x, size):
    return F.interpolate(x, size=size, mode='bilinear', align_corners=True)

def weighted_gap(supp_feat, mask):
    supp_feat = supp_feat * mask
    h, w = supp_feat.shape[-2:]
    area = F.avg_pool2d(mask, (h, w)) * h * w + 0.0005
    return F.avg_pool2d(supp_feat, (h, w)) * h * w / area

def gram(fea):
    b, c, h, w = fea.shape
    fea = fea.reshape(b, c, h * w)
    fea_t = fea.permute(0, 2, 1)
    return torch.bmm(fea, fea_t) / (torch.bmm(fea.norm(2, 2, True), fea_t.norm(2, 1, True)) + 1e-7)

class PPM(nn.Module):
    def __init__(self, c, r, bins):
        super().__init__()
        self.features = nn.ModuleList([nn.Sequential(nn.AdaptiveAvgPool2d(b), nn.Conv2d(c, r, 1, bias=False),
                                                     nn.BatchNorm2d(r), nn.ReLU(inplace=True)) for b in bins])
    def forward(self, x):
        return torch.cat([x] + [up(f(x), x.shape[2:]) for f in self.features], 1)

class BaseHead(nn.Module):  # BAM's learner_base = Sequential(PSPNet.ppm, PSPNet.cls)
    def __init__(self, c, classes):
        super().__init__()
        self.ppm = PPM(c, c // 4, (1, 2, 3, 6))
        self.cls = nn.Sequential(nn.Conv2d(c * 2, 512, 3, padding=1, bias=False), nn.BatchNorm2d(512),
                                 nn.ReLU(inplace=True), nn.Dropout2d(p=0.1), nn.Conv2d(512, classes, 1))
    def forward(self, x):
        return self.cls(self.ppm(x))

class ASPP(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.layer6_0 = nn.Sequential(nn.Conv2d(d, d, 1, bias=True), nn.ReLU())
        self.layer6_1 = nn.Sequential(nn.Conv2d(d, d, 1, bias=True), nn.ReLU())
        self.layer6_2 = nn.Sequential(nn.Conv2d(d, d, 3, padding=6, dilation=6, bias=True), nn.ReLU())
        self.layer6_3 = nn.Sequential(nn.Conv2d(d, d, 3, padding=12, dilation=12, bias=True), nn.ReLU())
        self.layer6_4 = nn.Sequential(nn.Conv2d(d, d, 3, padding=18, dilation=18, bias=True), nn.ReLU())
    def forward(self, x):
        size = x.shape[-2:]
        g = self.layer6_0(F.avg_pool2d(x, kernel_size=size)).expand(-1, -1, size[0], size[1])
        return torch.cat([g, self.layer6_1(x), self.layer6_2(x), self.layer6_3(x), self.layer6_4(x)], 1)

class Bam(nn.Module):
    def __init__(self, mid, d, c4, classes, shot):
        super().__init__()
        self.shot = shot
        self.base = BaseHead(c4, classes)
        self.down_query = nn.Sequential(nn.Conv2d(mid, d, 1, bias=False), nn.ReLU(inplace=True), nn.Dropout2d(p=0.5))
        self.down_supp = nn.Sequential(nn.Conv2d(mid, d, 1, bias=False), nn.ReLU(inplace=True), nn.Dropout2d(p=0.5))
        self.init_merge = nn.Sequential(nn.Conv2d(d * 2 + 1, d, 1, bias=False), nn.ReLU(inplace=True))
        self.ASPP_meta = ASPP(d)
        self.res1_meta = nn.Sequential(nn.Conv2d(d * 5, d, 1, bias=False), nn.ReLU(inplace=True))
        self.res2_meta = nn.Sequential(nn.Conv2d(d, d, 3, padding=1, bias=False), nn.ReLU(inplace=True),
                                       nn.Conv2d(d, d, 3, padding=1, bias=False), nn.ReLU(inplace=True))
        self.cls_meta = nn.Sequential(nn.Conv2d(d, d, 3, padding=1, bias=False), nn.ReLU(inplace=True),
                                      nn.Dropout2d(p=0.1), nn.Conv2d(d, 2, 1))
        self.gram_merge = nn.Conv2d(2, 1, 1, bias=False)
        self.cls_merge = nn.Conv2d(2, 1, 1, bias=False)
        if shot > 1:
            self.kshot_rw = nn.Sequential(nn.Conv2d(shot, 2, 1), nn.ReLU(inplace=True), nn.Conv2d(2, shot, 1))

    # BAM's forward from the backbone features on (query_feat_2/3/4, supp_feat_2/3/4).
    def forward(self, q_low, q_mid, q_high, base_feat4, supports, cat_idx):
        bs = q_mid.shape[0]
        query_feat = self.down_query(q_mid)
        pros, finals, masks, lows = [], [], [], []
        for s_low, s_mid, s_high, mask in supports:
            masks.append(mask)
            mask3 = up(mask, s_mid.shape[-2:])
            pros.append(weighted_gap(self.down_supp(s_mid), mask3))
            finals.append(s_high)
            lows.append(s_low)
        que_gram = gram(q_low)
        norm_max = torch.ones_like(que_gram).norm(dim=(1, 2))
        est = torch.cat([((que_gram - gram(s)).norm(dim=(1, 2)) / norm_max).reshape(bs, 1, 1, 1) for s in lows], 1)
        if self.shot > 1:
            val1, idx1 = est.sort(1)
            val2, idx2 = idx1.sort(1)
            weight = self.kshot_rw(val1).gather(1, idx2)
            weight_soft = torch.softmax(weight, 1)
        else:
            weight_soft = torch.ones_like(est)
        est_val = (weight_soft * est).sum(1, True)
        corrs = []
        for i, s in enumerate(finals):
            tmp_mask = up(masks[i], (s.size(2), s.size(2)))
            s = s * tmp_mask
            q = q_high
            b, c, sp, _ = q.shape
            tq = q.reshape(b, c, -1)
            tq_norm = torch.norm(tq, 2, 1, True)
            ts = s.reshape(b, c, -1).permute(0, 2, 1)
            ts_norm = torch.norm(ts, 2, 2, True)
            sim = torch.bmm(ts, tq) / (torch.bmm(ts_norm, tq_norm) + 1e-7)
            sim = sim.max(1)[0].reshape(b, sp * sp)
            sim = (sim - sim.min(1)[0].unsqueeze(1)) / (sim.max(1)[0].unsqueeze(1) - sim.min(1)[0].unsqueeze(1) + 1e-7)
            corrs.append(up(sim.reshape(b, 1, sp, sp), q_mid.shape[-2:]))
        corr = (weight_soft * torch.cat(corrs, 1)).sum(1, True)
        pro = (weight_soft.permute(0, 2, 1, 3) * torch.cat(pros, 2)).sum(2, True)
        merge = self.init_merge(torch.cat([query_feat, pro.expand_as(query_feat), corr], 1))
        base_out = self.base(base_feat4)
        meta = self.res1_meta(self.ASPP_meta(merge))
        meta = self.res2_meta(meta) + meta
        meta_out = self.cls_meta(meta)
        meta_soft, base_soft = meta_out.softmax(1), base_out.softmax(1)
        meta_bg, meta_fg = meta_soft[:, 0:1], meta_soft[:, 1:]
        if cat_idx is not None:  # BAM's training branch (cls_type 'Base')
            c_ids = torch.arange(base_out.shape[1])
            base_map = torch.cat([base_soft[i, (c_ids != 0) & (c_ids != cat_idx[i] + 1)].unsqueeze(0).sum(1, True)
                                  for i in range(bs)], 0)
        else:
            base_map = base_soft[:, 1:].sum(1, True)
        est_map = est_val.expand_as(meta_fg)
        meta_bg = self.gram_merge(torch.cat([meta_bg, est_map], 1))
        meta_fg = self.gram_merge(torch.cat([meta_fg, est_map], 1))
        merge_bg = self.cls_merge(torch.cat([meta_bg, base_map], 1))
        return torch.cat([merge_bg, meta_fg], 1), meta_out, base_out, est_val

t = load_file(sys.argv[1])
shot = int(t['shot'].item())
weights = {k[len('w.'):]: v for k, v in t.items() if k.startswith('w.')}
model = Bam(t['q_mid'].shape[1], weights['res1_meta.0.weight'].shape[0], t['base_feat4'].shape[1],
            weights['base.cls.4.bias'].shape[0], shot)
model.load_state_dict(weights, strict=True)
model.eval()
with torch.no_grad():
    supports = [(t['s_low%d' % k], t['s_mid%d' % k], t['s_high%d' % k], t['mask%d' % k]) for k in range(shot)]
    cat_idx = (t['exclude'] - 1).tolist() if 'exclude' in t else None
    final, meta, base, est = model(t['q_low'], t['q_mid'], t['q_high'], t['base_feat4'], supports, cat_idx)
save_file({'final': final, 'meta': meta, 'base': base}, sys.argv[2])
"#;

fn tiny(shot: usize, svf: bool) -> Config {
    Config {
        layers: 18,
        backbone_width: 0.25,
        reduce_dim: 8,
        shot,
        svf,
        ..Config::default()
    }
}

/// Every variable outside the backbones set to random values (BatchNorm statistics positive),
/// so that every module, including the merge convolutions that start at `[1, 0]`, shows.
fn randomize_heads(vs: &nn::VarStore) {
    tch::no_grad(|| {
        for (name, var) in vs.variables() {
            if name.contains("layer") || var.kind() != Kind::Float {
                continue;
            }
            let value = if name.ends_with("running_var") {
                Tensor::rand(var.size(), CPU_F32) + 0.5
            } else {
                Tensor::randn(var.size(), CPU_F32) * 0.3
            };
            var.shallow_clone().copy_(&value);
        }
    });
}

fn relu_randn(shape: &[i64]) -> Tensor {
    Tensor::randn(shape, CPU_F32).relu()
}

fn cross_check(shot: usize, exclude: Option<&[i64]>, name: &str) {
    let dir = common::scratch(name);
    tch::manual_seed(5 + shot as i64);
    let vs = nn::VarStore::new(Device::Cpu);
    let model = Bam::new(&vs.root(), &tiny(shot, false), Init::Zeros).unwrap();
    randomize_heads(&vs);
    let vars = vs.variables();
    let mid = vars["down_query.0.weight"].size()[1];
    let c4 = vars["base.ppm.features.0.1.weight"].size()[1];
    let low_channels = mid / 3; // ResNet: layer2 has half of layer3's channels
    let (batch, size, image) = (2, 9, 65);
    let features = |mask: Option<&Tensor>| {
        let high = relu_randn(&[batch, c4, size, size]);
        MetaFeatures {
            low: relu_randn(&[batch, low_channels, size, size]),
            mid: relu_randn(&[batch, mid, size, size]),
            high: match mask {
                Some(m) => high * m.upsample_bilinear2d([size, size], true, None, None),
                None => high,
            },
        }
    };
    let query = features(None);
    let masks: Vec<Tensor> = (0..shot)
        .map(|_| {
            Tensor::rand([batch, 1, image, image], CPU_F32)
                .gt(0.6)
                .to_kind(Kind::Float)
        })
        .collect();
    let supports: Vec<MetaFeatures> = masks.iter().map(|m| features(Some(m))).collect();
    let base_feat4 = relu_randn(&[batch, c4, size, size]);
    let exclude_tensor = exclude.map(Tensor::from_slice);
    let ours = tch::no_grad(|| {
        let base = model.base.head.forward_t(&base_feat4, false, false);
        model.head(
            &query,
            &supports,
            &masks,
            &base,
            exclude_tensor.as_ref(),
            false,
        )
    });

    let mut entries: Vec<(String, Tensor)> = vars
        .iter()
        .filter(|(n, _)| !n.starts_with("base.layer"))
        .map(|(n, t)| (format!("w.{n}"), t.shallow_clone()))
        .collect();
    entries.push(("q_low".into(), query.low.shallow_clone()));
    entries.push(("q_mid".into(), query.mid.shallow_clone()));
    entries.push(("q_high".into(), query.high.shallow_clone()));
    entries.push(("base_feat4".into(), base_feat4));
    for (k, (s, m)) in supports.iter().zip(&masks).enumerate() {
        entries.push((format!("s_low{k}"), s.low.shallow_clone()));
        entries.push((format!("s_mid{k}"), s.mid.shallow_clone()));
        entries.push((format!("s_high{k}"), s.high.shallow_clone()));
        entries.push((format!("mask{k}"), m.shallow_clone()));
    }
    entries.push(("shot".into(), Tensor::from(shot as i64)));
    if let Some(e) = exclude_tensor {
        entries.push(("exclude".into(), e));
    }
    let (input, output) = (dir.join("in.safetensors"), dir.join("out.safetensors"));
    Tensor::write_safetensors(&entries, &input).unwrap();
    common::run_python(PYTORCH_BAM, &[&input, &output]);
    let theirs: HashMap<String, Tensor> = Tensor::read_safetensors(&output)
        .unwrap()
        .into_iter()
        .collect();
    for (key, ours) in [
        ("base", &ours.base_logits),
        ("meta", &ours.meta_logits),
        ("final", &ours.logits),
    ] {
        let expected = &theirs[key];
        assert_eq!(ours.size(), expected.size(), "{key}");
        let scale = expected.abs().max().double_value(&[]);
        let err = (ours - expected).abs().max().double_value(&[]) / scale;
        // float32 rounding; a wrong module gives errors of order 1.
        assert!(err < 1e-4, "{name} {key}: relative error {err}");
    }
}

#[test]
fn bam_one_shot_matches_pytorch() {
    cross_check(1, None, "bam-1shot");
}

#[test]
fn bam_two_shot_with_training_base_exclusion_matches_pytorch() {
    cross_check(2, Some(&[3, 7]), "bam-2shot");
}

#[test]
fn base_learner_gets_no_gradient_and_stays_unchanged_in_the_meta_stage() {
    tch::manual_seed(3);
    let config = Config {
        method: svf::config::Method::Bam,
        ..tiny(2, true)
    };
    let vs = nn::VarStore::new(Device::Cpu);
    let model = Bam::new(&vs.root(), &config, Init::Random).unwrap();
    model.decompose_base_into_meta(&vs, &config);
    // The trainer's own trainable set.
    let trainable = svf::train::trainable_parameters(&vs, &config);
    let before: HashMap<String, Tensor> = vs
        .variables()
        .into_iter()
        .filter(|(n, _)| n.starts_with("base."))
        .map(|(n, t)| (n, t.copy()))
        .collect();
    assert!(!before.is_empty());
    let query = Tensor::randn([2, 3, 65, 65], CPU_F32);
    let supports = Tensor::randn([2, 2, 3, 65, 65], CPU_F32);
    let labels = Tensor::rand([2, 2, 65, 65], CPU_F32)
        .gt(0.5)
        .to_kind(Kind::Int64);
    let exclude = Tensor::from_slice(&[1i64, 15]);
    let out = model.forward(&query, &supports, &labels, Some(&exclude), true);
    model.loss(&out, &labels.select(1, 0)).backward();
    let mut singular = 0;
    for (name, tensor, _) in &trainable {
        assert!(!name.starts_with("base."), "{name}");
        let grad = tensor.grad();
        assert!(grad.defined(), "{name} got no gradient");
        if name.ends_with("vector_S") {
            singular += 1;
            assert!(["layer2.", "layer3.", "layer4."]
                .iter()
                .any(|s| name.starts_with(s)));
        }
        tch::no_grad(|| {
            let _ = tensor.shallow_clone().g_sub_(&(grad * 0.1));
        });
    }
    assert!(singular > 0);
    for (name, tensor) in vs.variables() {
        if let Some(old) = before.get(&name) {
            assert!(!tensor.requires_grad(), "{name}");
            assert!(!tensor.grad().defined(), "{name} got a gradient");
            assert!(tensor.equal(old), "{name} changed in the meta stage");
        }
    }
}

#[test]
fn svf_copy_starts_equal_to_the_base_backbone() {
    tch::manual_seed(4);
    let config = Config {
        svf_rank_multiple: 1,
        ..tiny(1, true)
    };
    let vs = nn::VarStore::new(Device::Cpu);
    let model = Bam::new(&vs.root(), &config, Init::Random).unwrap();
    model.decompose_base_into_meta(&vs, &config);
    let images = Tensor::randn([1, 3, 65, 65], CPU_F32);
    let (ours, base) = tch::no_grad(|| {
        (
            model.meta_features(&images, None).high,
            model.base.encode(&images, false),
        )
    });
    let err = (&ours - &base).abs().max().double_value(&[]) / base.abs().max().double_value(&[]);
    assert!(err < 1e-4, "relative error {err}");
}

/// A 2-shot BAM (+SVF) model with random meta modules and, with SVF, a trained-looking (non-unit)
/// `vector_S`, and its weights written to `dir/weights.safetensors`.
fn random_bam(dir: &std::path::Path, svf: bool) -> (Config, std::path::PathBuf) {
    tch::manual_seed(8);
    let config = Config {
        method: svf::config::Method::Bam,
        ..tiny(2, svf)
    };
    let vs = nn::VarStore::new(Device::Cpu);
    let model = Bam::new(&vs.root(), &config, Init::Random).unwrap();
    model.decompose_base_into_meta(&vs, &config);
    randomize_heads(&vs);
    tch::no_grad(|| {
        for (name, var) in vs.variables() {
            if name.ends_with("vector_S") {
                let _ = var
                    .shallow_clone()
                    .g_mul_(&(Tensor::rand(var.size(), CPU_F32) + 0.5));
            }
        }
    });
    let path = dir.join("weights.safetensors");
    Tensor::write_safetensors(&svf::model::model_weights(&vs), &path).unwrap();
    (config, path)
}

fn episode_logits(model: &svf::model::FewShotModel) -> Tensor {
    tch::manual_seed(9);
    let query = Tensor::randn([1, 3, 65, 65], CPU_F32);
    let supports = Tensor::randn([1, 2, 3, 65, 65], CPU_F32);
    let labels = Tensor::randint(2, [1, 2, 65, 65], (Kind::Int64, Device::Cpu));
    tch::no_grad(|| model.logits(&query, &supports, &labels))
}

#[test]
fn fused_bam_svf_computes_what_the_decomposed_copy_computes() {
    let dir = common::scratch("bam-fused");
    let (config, path) = random_bam(&dir, true);
    let (_, decomposed) = svf::inference::load_model(&config, &path, Device::Cpu, false).unwrap();
    let (fused_vs, fused) = svf::inference::load_model(&config, &path, Device::Cpu, true).unwrap();
    let names: Vec<String> = fused_vs.variables().into_keys().collect();
    assert!(names.iter().all(|n| !n.contains("vector_S")));
    // The fused copy is at the root, full-rank, beside the base learner.
    assert!(names.contains(&"layer4.1.conv2.weight".to_string()));
    assert!(names.contains(&"base.layer4.1.conv2.weight".to_string()));
    let (a, b) = (episode_logits(&decomposed), episode_logits(&fused));
    let diff = (&a - &b).abs().max().double_value(&[]);
    assert!(diff < 1e-5, "fused logits differ by {diff}");
}

#[test]
fn released_bam_naming_loads_the_same_model() {
    let dir = common::scratch("bam-released");
    let (config, path) = random_bam(&dir, true);
    // The SVF authors' BAM+SVF naming: the base learner's backbone as `layer{i}p.*`, its head as
    // `learner_base.{0,1}.*`; the decomposed copy and the meta modules as ours.
    let released: Vec<(String, Tensor)> = svf::checkpoint::read_tensors(&path, "test")
        .unwrap()
        .into_iter()
        .map(|(name, t)| {
            let name = if let Some(rest) = name.strip_prefix("base.ppm.") {
                format!("learner_base.0.{rest}")
            } else if let Some(rest) = name.strip_prefix("base.cls.") {
                format!("learner_base.1.{rest}")
            } else if let Some(rest) = name.strip_prefix("base.layer") {
                let (stage, rest) = rest.split_once('.').unwrap();
                format!("layer{stage}p.{rest}")
            } else {
                name
            };
            (name, t)
        })
        .collect();
    assert!(bam::is_released_naming(&released));
    let released_path = dir.join("released.safetensors");
    Tensor::write_safetensors(&released, &released_path).unwrap();
    let (_, ours) = svf::inference::load_model(&config, &path, Device::Cpu, false).unwrap();
    let (_, theirs) =
        svf::inference::load_model(&config, &released_path, Device::Cpu, false).unwrap();
    assert!(episode_logits(&ours).equal(&episode_logits(&theirs)));
}

/// What BAM's code would have saved for `ours` (our BAM weights): its `train_base.py`'s PSPNet
/// base learner (the backbone under both `layer{i}` and `encoder.{i}`, `ppm`, `cls`) and its
/// `train.py`'s BAM (backbone `layer{i}`, base head `learner_base.{0,1}`, meta modules), as
/// multi-GPU checkpoints (`module.` prefix, under `state_dict`), then converted by
/// scripts/convert_weights.py into `pspnet.safetensors` and `bam.safetensors`.
const BAM_RELEASED: &str = r#"
import subprocess, sys, torch
from safetensors.torch import load_file
ours, out, convert = load_file(sys.argv[1]), sys.argv[2], sys.argv[3]
pspnet, bam = {}, {}
for name, t in ours.items():
    if name.startswith('base.'):
        rest = name[len('base.'):]
        pspnet['module.' + rest] = t
        if rest.startswith('layer'):
            stage, tail = rest[len('layer'):].split('.', 1)
            pspnet['module.encoder.%s.%s' % (stage, tail)] = t
            bam['module.' + rest] = t
        elif rest.startswith('ppm.'):
            bam['module.learner_base.0.' + rest[len('ppm.'):]] = t
        else:
            bam['module.learner_base.1.' + rest[len('cls.'):]] = t
    else:
        bam['module.' + name] = t
for stem, sd in (('pspnet', pspnet), ('bam', bam)):
    torch.save({'epoch': 7, 'state_dict': sd}, '%s/%s.pth' % (out, stem))
    subprocess.run([sys.executable, convert, '%s/%s.pth' % (out, stem),
                    '%s/%s.safetensors' % (out, stem)], check=True)
"#;

#[test]
fn released_bam_checkpoints_load_after_convert_weights() {
    let _torch = common::exclusive_torch();
    let dir = common::scratch("bam-converted");
    let (config, ours) = random_bam(&dir, false);
    let expected: HashMap<String, Tensor> = svf::checkpoint::read_tensors(&ours, "test")
        .unwrap()
        .into_iter()
        .collect();
    let convert =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/convert_weights.py");
    common::run_python(BAM_RELEASED, &[&ours, &dir, &convert]);

    // The base learner, as a meta stage's `base_learner`: every base variable as ours.
    let loaded = nn::VarStore::new(Device::Cpu);
    let _bam = Bam::new(&loaded.root(), &config, Init::Zeros).unwrap();
    svf::train::base::load_base_learner(&loaded, &config, &dir.join("pspnet.safetensors")).unwrap();
    let mut compared = 0;
    for (name, var) in loaded.variables() {
        if name.starts_with("base.") {
            assert!(var.equal(&expected[&name]), "{name}");
            compared += 1;
        }
    }
    assert!(compared > 100, "{compared}");

    // The whole BAM, as svf-eval's `--weights`: the same predictions as ours.
    let (_, from_ours) = svf::inference::load_model(&config, &ours, Device::Cpu, false).unwrap();
    let released = dir.join("bam.safetensors");
    let (_, from_released) =
        svf::inference::load_model(&config, &released, Device::Cpu, false).unwrap();
    let (a, b) = (episode_logits(&from_ours), episode_logits(&from_released));
    assert!(a.equal(&b));
}

/// `configs/bam/`: BAM's base-stage and meta-stage recipes (chunbolang/BAM's configs and
/// `train_base.py` / `train.py`) and the SVF paper's for BAM+SVF (REFERENCE §8), one file per
/// dataset, fold, backbone and stage; every meta stage loads its own fold's base learner run.
#[test]
fn bam_configs_encode_the_recipes() {
    use svf::config::{DilationPattern, LrScheduleKind, Method, Stage, TrainFilter};
    use svf::train::lr_scale;
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("configs/bam");
    let mut files = 0;
    for dataset in ["pascal", "coco"] {
        let coco = dataset == "coco";
        for fold in 0..4 {
            for vgg in [false, true] {
                let (suffix, backbone) = if vgg {
                    ("_vgg16", "vgg16")
                } else {
                    ("", "resnet50")
                };
                let load = |stage: &str| {
                    let name = format!("{dataset}_split{fold}{suffix}_{stage}.yaml");
                    (Config::load(&dir.join(&name), &[]).unwrap(), name)
                };
                let (base, name) = load("base");
                files += 1;
                assert_eq!(
                    (base.method, base.stage),
                    (Method::Bam, Stage::Base),
                    "{name}"
                );
                assert_eq!(
                    (base.split, base.use_coco, base.vgg),
                    (fold, coco, vgg),
                    "{name}"
                );
                assert_eq!(base.use_split_coco, coco, "{name}");
                assert_eq!((base.train_h, base.train_w, base.val_size), (417, 417, 417));
                assert_eq!((base.scale_min, base.scale_max), (0.5, 2.0), "{name}");
                assert_eq!((base.rotate_min, base.rotate_max), (-10.0, 10.0), "{name}");
                assert_eq!((base.batch_size, base.base_lr), (12, 2.5e-4), "{name}");
                assert_eq!((base.lr_schedule, base.power), (LrScheduleKind::Poly, 0.9));
                // BAM's index_split: 0 on PASCAL (backbone at base_lr, the rest 10x), -1 on COCO
                // (everything 10x).
                assert_eq!(lr_scale(&base, "ppm.0.1.weight"), 10.0, "{name}");
                assert_eq!(lr_scale(&base, "cls.4.weight"), 10.0, "{name}");
                let backbone_scale = if coco { 10.0 } else { 1.0 };
                assert_eq!(lr_scale(&base, "layer3.0.conv2.weight"), backbone_scale);
                assert_eq!(base.epochs, if coco { 20 } else { 100 }, "{name}");
                let batch_size_val = match (coco, vgg) {
                    (false, false) => 6,
                    (false, true) => 10,
                    (true, false) => 4,
                    (true, true) => 8,
                };
                assert_eq!(base.batch_size_val, batch_size_val, "{name}");
                assert!(!base.ori_resize && !base.svf, "{name}");
                assert_eq!((base.stop_interval, base.val_freq), (75, 1), "{name}");
                assert_eq!(base.dilation, DilationPattern::Pfenet, "{name}");
                let pretrained = if vgg { "vgg16_bn" } else { "resnet50_v2" };
                assert_eq!(
                    base.backbone_weights.as_deref(),
                    Some(std::path::Path::new(&format!(
                        "initmodel/{pretrained}.safetensors"
                    )))
                );
                let base_run = format!("runs/bam/{dataset}/split{fold}/{backbone}/base");
                assert_eq!(base.save_path, std::path::Path::new(&base_run), "{name}");

                for variant in ["bam", "svf"] {
                    let (meta, name) = load(variant);
                    files += 1;
                    let svf = variant == "svf";
                    assert_eq!(
                        (meta.method, meta.stage),
                        (Method::Bam, Stage::Meta),
                        "{name}"
                    );
                    assert_eq!((meta.split, meta.use_coco, meta.vgg), (fold, coco, vgg));
                    assert_eq!(meta.use_split_coco, coco, "{name}");
                    // The base learner of this dataset, fold and backbone, built alike.
                    assert_eq!(
                        meta.base_learner.as_deref(),
                        Some(std::path::Path::new(&base_run)),
                        "{name}"
                    );
                    assert_eq!(meta.dilation, base.dilation, "{name}");
                    assert_eq!(meta.layers, base.layers, "{name}");
                    assert_eq!(meta.svf, svf, "{name}");
                    assert_eq!(meta.train_filter, TrainFilter::Bam, "{name}");
                    let crop = if coco { 641 } else { 473 };
                    assert_eq!(
                        (meta.train_h, meta.train_w, meta.val_size),
                        (crop, crop, crop)
                    );
                    let scales = if coco { (0.8, 1.25) } else { (0.9, 1.1) };
                    assert_eq!((meta.scale_min, meta.scale_max), scales, "{name}");
                    assert_eq!((meta.batch_size, meta.batch_size_val), (8, 1), "{name}");
                    assert_eq!(meta.epochs, if coco { 50 } else { 200 }, "{name}");
                    assert_eq!(meta.val_half_epoch, coco, "{name}");
                    assert_eq!((meta.val_freq, meta.val_episodes), (1, 1000), "{name}");
                    assert_eq!((meta.stop_interval, meta.shot), (75, 1), "{name}");
                    assert!(meta.fix_bn && meta.ori_resize, "{name}");
                    assert_eq!(meta.ppm_scales, [60, 30, 15, 8], "{name}");
                    assert_eq!(meta.aux_weight, 1.0, "{name}");
                    let meta_lr = lr_scale(&meta, "cls_merge.weight") * meta.base_lr;
                    assert_eq!(
                        lr_scale(&meta, "down_query.0.weight"),
                        lr_scale(&meta, "kshot_rw.0.weight")
                    );
                    if svf {
                        // The paper's recipe: meta learner at 0.015, vector_S at 0.0015, constant.
                        let vector_s = lr_scale(&meta, "layer3.2.conv2.vector_S") * meta.base_lr;
                        assert!((meta_lr - 0.015).abs() < 1e-12, "{name}: {meta_lr}");
                        assert!((vector_s - 0.0015).abs() < 1e-12, "{name}: {vector_s}");
                        assert_eq!(meta.lr_schedule, LrScheduleKind::Constant, "{name}");
                    } else {
                        // BAM's: 10 x base_lr 0.005 (index_split: -1), poly 0.9.
                        assert!((meta_lr - 0.05).abs() < 1e-12, "{name}: {meta_lr}");
                        assert_eq!(meta.lr_schedule, LrScheduleKind::Poly, "{name}");
                    }
                    let run = format!("runs/bam/{dataset}/split{fold}/{backbone}/{variant}");
                    assert_eq!(meta.save_path, std::path::Path::new(&run), "{name}");
                }
            }
        }
    }
    // Nothing else in the folder but the shared files the per-run files build on.
    let shared = [
        "base",
        "pascal_base",
        "coco_base",
        "meta",
        "pascal",
        "coco",
        "pascal_svf",
        "coco_svf",
    ];
    assert_eq!(
        std::fs::read_dir(&dir).unwrap().count(),
        files + shared.len()
    );
    assert_eq!(files, 48);
}
