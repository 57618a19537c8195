//! The PFENet head against an independent PyTorch computation: the head rebuilt in PyTorch from
//! PFENet's module layout (`model/PFENet.py`: `down_query`, `init_merge`, `alpha_conv`, `beta_conv`,
//! `inner_cls`, `res1`, `res2`, `cls`), loaded from our variables with `strict=True`, run on the same
//! features in eval mode, 2-shot, with a pyramid bin larger than the feature map.

use std::collections::HashMap;

mod common;

use svf::model::{PfeHead, QueryFeatures, SupportFeatures};
use tch::{nn, Device, Kind, Tensor};

const CPU_F32: (Kind, Device) = (Kind::Float, Device::Cpu);

const PYTORCH_PFENET_HEAD: &str = r#"
import sys
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

def up(x, size):
    return F.interpolate(x, size=size, mode='bilinear', align_corners=True)

def masked_pool(feat, mask):  # PFENet's Weighted_GAP
    h, w = feat.shape[-2:]
    area = F.avg_pool2d(mask, (h, w)) * h * w + 0.0005
    return F.avg_pool2d(feat * mask, (h, w)) * h * w / area

def prior(q, s, mask):  # PFENet's training-free prior, cosine eps 1e-7
    eps = 1e-7
    s = s * up(mask, s.shape[-2:])
    b, c, h, w = q.shape
    tq = q.reshape(b, c, -1)
    tq_norm = torch.norm(tq, 2, 1, True)
    ts = s.reshape(b, c, -1).permute(0, 2, 1)
    ts_norm = torch.norm(ts, 2, 2, True)
    sim = torch.bmm(ts, tq) / (torch.bmm(ts_norm, tq_norm) + eps)
    sim = sim.max(1)[0].reshape(b, h * w)
    lo, hi = sim.min(1)[0].unsqueeze(1), sim.max(1)[0].unsqueeze(1)
    return ((sim - lo) / (hi - lo + eps)).reshape(b, 1, h, w)

def classifier(d):
    return nn.Sequential(nn.Conv2d(d, d, 3, padding=1, bias=False), nn.ReLU(inplace=True),
                         nn.Dropout2d(p=0.1), nn.Conv2d(d, 2, 1))

def double_conv(d):
    return nn.Sequential(nn.Conv2d(d, d, 3, padding=1, bias=False), nn.ReLU(inplace=True),
                         nn.Conv2d(d, d, 3, padding=1, bias=False), nn.ReLU(inplace=True))

class Head(nn.Module):
    def __init__(self, mid, d, bins):
        super().__init__()
        self.bins = bins
        self.down_query = nn.Sequential(nn.Conv2d(mid, d, 1, bias=False), nn.ReLU(inplace=True), nn.Dropout2d(p=0.5))
        self.down_supp = nn.Sequential(nn.Conv2d(mid, d, 1, bias=False), nn.ReLU(inplace=True), nn.Dropout2d(p=0.5))
        self.init_merge = nn.ModuleList([nn.Sequential(nn.Conv2d(2 * d + 1, d, 1, bias=False), nn.ReLU(inplace=True)) for _ in bins])
        self.alpha_conv = nn.ModuleList([nn.Sequential(nn.Conv2d(2 * d, d, 1, bias=False), nn.ReLU()) for _ in bins[1:]])
        self.beta_conv = nn.ModuleList([double_conv(d) for _ in bins])
        self.inner_cls = nn.ModuleList([classifier(d) for _ in bins])
        self.res1 = nn.Sequential(nn.Conv2d(d * len(bins), d, 1, bias=False), nn.ReLU(inplace=True))
        self.res2 = double_conv(d)
        self.cls = classifier(d)

    def forward(self, q_mid, q_high, supports):
        query_feat = self.down_query(q_mid)
        protos, priors = [], []
        for s_mid, s_high, mask in supports:
            supp_feat = self.down_supp(s_mid)
            protos.append(masked_pool(supp_feat, up(mask, supp_feat.shape[-2:])))
            priors.append(up(prior(q_high, s_high, mask), q_mid.shape[-2:]))
        corr = up(torch.cat(priors, 1).mean(1, True), query_feat.shape[-2:])
        proto = sum(protos) / len(protos)
        pyramid, aux = [], []
        for idx, b in enumerate(self.bins):
            qb = nn.AdaptiveAvgPool2d(b)(query_feat)
            merged = self.init_merge[idx](torch.cat([qb, proto.expand(-1, -1, b, b), up(corr, (b, b))], 1))
            if idx >= 1:
                previous = up(pyramid[idx - 1], (b, b))
                merged = self.alpha_conv[idx - 1](torch.cat([merged, previous], 1)) + merged
            merged = self.beta_conv[idx](merged) + merged
            aux.append(self.inner_cls[idx](merged))
            pyramid.append(up(merged, query_feat.shape[-2:]))
        fused = self.res1(torch.cat(pyramid, 1))
        fused = self.res2(fused) + fused
        return self.cls(fused), aux

t = load_file(sys.argv[1])
shots = int(t['shots'].item())
bins = t['bins'].tolist()
head = Head(t['q_mid'].shape[1], t['res1.0.weight'].shape[0], bins)
head.load_state_dict({k: v for k, v in t.items() if '.' in k}, strict=True)
head.eval()
with torch.no_grad():
    supports = [(t['s_mid%d' % k], t['s_high%d' % k], t['mask%d' % k]) for k in range(shots)]
    logits, aux = head(t['q_mid'], t['q_high'], supports)
out = {'logits': logits}
for i, a in enumerate(aux):
    out['aux%d' % i] = a
save_file({k: v.contiguous() for k, v in out.items()}, sys.argv[2])
"#;

#[test]
fn pfenet_head_matches_pytorch() {
    let dir = common::scratch("pytorch-head");
    tch::manual_seed(11);
    let (mid_channels, high_channels, reduce_dim) = (12, 10, 8);
    // The 9×9 feature map is smaller than the first bin: adaptive pooling enlarges it there.
    let bins = [12i64, 6, 3];
    let vs = nn::VarStore::new(Device::Cpu);
    let head = PfeHead::new(&vs.root(), mid_channels, reduce_dim, &bins);
    let (batch, size, shots) = (2, 9, 2);
    let query = QueryFeatures {
        mid: Tensor::randn([batch, mid_channels, size, size], CPU_F32).relu(),
        high: Tensor::randn([batch, high_channels, size, size], CPU_F32).relu(),
    };
    let supports: Vec<SupportFeatures> = (0..shots)
        .map(|_| {
            let mask = Tensor::rand([batch, 1, size, size], CPU_F32)
                .gt(0.5)
                .to_kind(Kind::Float);
            SupportFeatures {
                mid: Tensor::randn([batch, mid_channels, size, size], CPU_F32).relu(),
                high: Tensor::randn([batch, high_channels, size, size], CPU_F32).relu() * &mask,
                mask,
            }
        })
        .collect();
    let ours = tch::no_grad(|| head.forward(&query, &supports, false, true));

    let mut entries: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
    entries.push(("q_mid".into(), query.mid.shallow_clone()));
    entries.push(("q_high".into(), query.high.shallow_clone()));
    for (k, s) in supports.iter().enumerate() {
        entries.push((format!("s_mid{k}"), s.mid.shallow_clone()));
        entries.push((format!("s_high{k}"), s.high.shallow_clone()));
        entries.push((format!("mask{k}"), s.mask.shallow_clone()));
    }
    entries.push(("shots".into(), Tensor::from(shots)));
    entries.push(("bins".into(), Tensor::from_slice(&bins)));
    let (input, output) = (dir.join("in.safetensors"), dir.join("out.safetensors"));
    Tensor::write_safetensors(&entries, &input).unwrap();
    common::run_python(PYTORCH_PFENET_HEAD, &[&input, &output]);
    let theirs: HashMap<String, Tensor> = Tensor::read_safetensors(&output)
        .unwrap()
        .into_iter()
        .collect();

    let compare = |name: &str, ours: &Tensor| {
        let expected = &theirs[name];
        assert_eq!(ours.size(), expected.size(), "{name}");
        let scale = expected.abs().max().double_value(&[]);
        let err = (ours - expected).abs().max().double_value(&[]) / scale;
        // float32 rounding through ~12 convolutions; a wrong layer gives errors of order 1.
        assert!(err < 1e-4, "{name}: relative error {err}");
    };
    compare("logits", &ours.logits);
    assert_eq!(ours.aux_logits.len(), bins.len());
    for (i, aux) in ours.aux_logits.iter().enumerate() {
        compare(&format!("aux{i}"), aux);
    }
}
