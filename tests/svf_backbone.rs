//! SVF decomposition and backbones end to end: exactness of the SVD form, the reference's rank
//! rule and names on ResNet-50, the trainable set, loading/saving/recomposing weights, the
//! `svf-decompose` command and a cross-check against PyTorch.

use std::collections::HashMap;
use std::path::Path;
use std::process::Command;

mod common;

use common::scratch;
use svf::backbone::{self, Backbone, BackboneError};
use svf::config::Config;
use svf::svf::{decompose_conv, ConvGeometry, SvdConv2d, SvfOptions};
use tch::{nn, Device, Kind, Tensor};

const CPU_F32: (Kind, Device) = (Kind::Float, Device::Cpu);

/// max |a − b| / max |b|.
fn rel_max_err(a: &Tensor, b: &Tensor) -> f64 {
    let diff = (a - b).abs().max().double_value(&[]);
    diff / b.abs().max().double_value(&[]).max(1e-30)
}

fn small(layers: usize, svf: bool, rank_multiple: usize) -> Config {
    Config {
        layers,
        backbone_width: 0.25,
        svf,
        svf_rank_multiple: rank_multiple,
        ..Config::default()
    }
}

/// Non-trivial BatchNorm statistics and affine parameters, so that loading them matters.
fn randomize_batch_norm(vs: &nn::VarStore) {
    tch::no_grad(|| {
        for (name, var) in vs.variables() {
            let size = var.size();
            let mut var = var.shallow_clone();
            if name.ends_with("running_mean") || name.ends_with(".bias") {
                var.copy_(&(Tensor::randn(&size, CPU_F32) * 0.1));
            } else if name.ends_with("running_var") {
                var.copy_(&(Tensor::rand(&size, CPU_F32) + 0.5));
            } else if name.ends_with("num_batches_tracked") {
                var.copy_(&Tensor::from(7i64));
            } else if size.len() == 1 && name.ends_with(".weight") {
                var.copy_(&(Tensor::randn(&size, CPU_F32) * 0.1 + 1.0));
            }
        }
    });
}

/// Runs both backbones stage by stage on the same input; returns each stage's relative error.
fn stage_errors(a: &Backbone, b: &Backbone, size: i64) -> Vec<f64> {
    tch::no_grad(|| {
        let mut xa = Tensor::randn([2, 3, size, size], CPU_F32);
        let mut xb = xa.shallow_clone();
        (0..5)
            .map(|i| {
                xa = a.forward_layer(i, &xa, false);
                xb = b.forward_layer(i, &xb, false);
                rel_max_err(&xb, &xa)
            })
            .collect()
    })
}

#[test]
fn decomposed_conv_equals_original_at_rank_multiple_1() {
    tch::manual_seed(1);
    let options = SvfOptions {
        rank_multiple: 1,
        ..SvfOptions::default()
    };
    // (in, out, kernel, stride, padding, dilation, bias)
    let cases = [
        (16, 8, 1, 1, 0, 1, false),
        (8, 16, 1, 2, 0, 1, true),
        (3, 64, 3, 2, 1, 1, false),
        (6, 10, 3, 1, 1, 1, true),
        (6, 10, 3, 1, 2, 2, false),
        (6, 10, 3, 1, 4, 4, true),
        (3, 8, 7, 2, 3, 1, true),
        (5, 7, 3, 1, 0, 1, false),
    ];
    for (inp, out, k, stride, padding, dilation, bias) in cases {
        let weight = Tensor::randn([out, inp, k, k], CPU_F32);
        let bias = bias.then(|| Tensor::randn([out], CPU_F32));
        let geometry = ConvGeometry {
            stride,
            padding,
            dilation,
        };
        let shape = weight.size();
        let rank = options.rank_for("conv", &shape).unwrap();
        assert_eq!(rank, out.min(inp * k * k));
        let factors = decompose_conv(&weight, rank);
        assert_eq!(factors.v.size(), [rank, inp, k, k]);
        assert_eq!(factors.u.size(), [out, rank, 1, 1]);
        assert_eq!(factors.s.size(), [1, rank, 1, 1]);
        let svd = SvdConv2d {
            conv_v: factors.v,
            vector_s: factors.s,
            conv_u: factors.u,
            conv_u_bias: bias.as_ref().map(Tensor::shallow_clone),
            geometry,
        };
        let x = Tensor::randn([2, inp, 19, 19], CPU_F32);
        let expected = geometry.conv2d(&x, &weight, bias.as_ref());
        let err = rel_max_err(&svd.forward(&x), &expected);
        assert!(err < 1e-4, "{shape:?} {geometry:?}: {err}");
    }
}

#[test]
fn decomposed_small_resnets_equal_full_rank_layer_by_layer() {
    let dir = scratch("layer-by-layer");
    for layers in [18, 50] {
        tch::manual_seed(2);
        let full_vs = nn::VarStore::new(Device::Cpu);
        let full = Backbone::new(&full_vs.root(), &small(layers, false, 1)).unwrap();
        randomize_batch_norm(&full_vs);
        let file = dir.join(format!("resnet{layers}.safetensors"));
        backbone::write_weights(&backbone::backbone_variables(&full_vs), &file).unwrap();

        let config = small(layers, true, 1);
        let svf_vs = nn::VarStore::new(Device::Cpu);
        let decomposed = Backbone::new(&svf_vs.root(), &config).unwrap();
        let report = backbone::load_pretrained(&svf_vs, &file, &config).unwrap();
        assert!(report.layers.iter().all(|l| l.rank == l.full_rank));
        assert!(report
            .layers
            .iter()
            .all(|l| l.relative_error.unwrap() < 1e-5));
        for (stage, err) in stage_errors(&full, &decomposed, 65).iter().enumerate() {
            assert!(*err < 1e-4, "ResNet-{layers} layer{stage}: {err}");
        }
    }
}

/// ResNet-50 conv shapes `(name, out, in, kernel)` from the architecture's description.
fn resnet50_convs() -> Vec<(String, i64, i64, i64)> {
    let mut convs = vec![
        ("layer0.0".to_string(), 64, 3, 3),
        ("layer0.3".to_string(), 64, 64, 3),
        ("layer0.6".to_string(), 128, 64, 3),
    ];
    let mut inplanes = 128;
    for (stage, (planes, blocks)) in [(64, 3), (128, 4), (256, 6), (512, 3)].iter().enumerate() {
        for block in 0..*blocks {
            let prefix = format!("layer{}.{block}", stage + 1);
            convs.push((format!("{prefix}.conv1"), *planes, inplanes, 1));
            convs.push((format!("{prefix}.conv2"), *planes, *planes, 3));
            convs.push((format!("{prefix}.conv3"), planes * 4, *planes, 1));
            if block == 0 {
                convs.push((format!("{prefix}.downsample.0"), planes * 4, inplanes, 1));
            }
            inplanes = planes * 4;
        }
    }
    convs
}

#[test]
fn resnet50_reference_ranks_names_trainable_set_and_shapes() {
    tch::manual_seed(3);
    let vs = nn::VarStore::new(Device::Cpu);
    let config = Config {
        svf: true,
        ..Config::default()
    };
    let backbone = Backbone::new(&vs.root(), &config).unwrap();
    let vars = vs.variables();

    // Ranks: floor(min(out, in·k·k) / 4) · 4 for every conv; the stem's 3→64 keeps 24 of 27.
    let convs = resnet50_convs();
    assert_eq!(convs.len(), 55);
    for (name, out, inp, k) in &convs {
        let expected = (out.min(&(inp * k * k)) / 4 * 4).max(1);
        assert_eq!(
            vars[&format!("{name}.vector_S")].size(),
            [1, expected, 1, 1],
            "{name}"
        );
        assert_eq!(
            vars[&format!("{name}.conv_V.weight")].size(),
            [expected, *inp, *k, *k]
        );
        assert_eq!(
            vars[&format!("{name}.conv_U.weight")].size(),
            [*out, expected, 1, 1]
        );
    }
    assert_eq!(vars["layer0.0.vector_S"].size(), [1, 24, 1, 1]);

    // Names: 55 convs × (conv_U.weight, conv_V.weight, vector_S) + 55 BatchNorms × 5 entries,
    // no bias (the convs have none) and no full-rank weight left.
    assert_eq!(vars.len(), 55 * 3 + 55 * 5);
    for name in [
        "layer0.0.conv_U.weight",
        "layer0.0.conv_V.weight",
        "layer0.0.vector_S",
        "layer0.1.weight",
        "layer0.1.bias",
        "layer0.1.running_mean",
        "layer0.1.running_var",
        "layer0.1.num_batches_tracked",
        "layer0.7.weight",
        "layer1.0.downsample.0.conv_U.weight",
        "layer1.0.downsample.1.running_var",
        "layer3.5.bn3.weight",
        "layer4.2.conv3.vector_S",
    ] {
        assert!(vars.contains_key(name), "{name}");
    }
    assert!(!vars.keys().any(|n| n.ends_with("conv_U.bias")));

    // Trainable: exactly the vector_S of layer2..4. Their sizes by hand (ResNet-50 channels are
    // multiples of 4, so rank = full rank = min(out, in·k·k)):
    // layer2: block 0 128+128+128+256 (downsample 256→512), blocks 1-3 3·128 → 640 + 1152 = 1792
    // layer3: block 0 256·3+512, blocks 1-5 3·256 → 1280 + 3840 = 5120
    // layer4: block 0 512·3+1024, blocks 1-2 3·512 → 2560 + 3072 = 5632;  total 12544.
    let trainable: Vec<&String> = vars
        .iter()
        .filter(|(_, t)| t.requires_grad())
        .map(|(n, _)| n)
        .collect();
    let expected: Vec<&String> = vars
        .keys()
        .filter(|n| {
            n.ends_with(".vector_S") && !n.starts_with("layer0") && !n.starts_with("layer1")
        })
        .collect();
    assert_eq!(trainable.len(), expected.len());
    assert!(trainable.iter().all(|n| expected.contains(n)));
    let count: i64 = vs
        .trainable_variables()
        .iter()
        .map(|t| t.numel() as i64)
        .sum();
    assert_eq!(count, 12544);
    assert_eq!(vs.trainable_variables().len(), expected.len());

    // Output shapes at 473×473 (one forward, no autograd).
    let shapes: Vec<Vec<i64>> = tch::no_grad(|| {
        let mut x = Tensor::randn([1, 3, 473, 473], CPU_F32);
        (0..5)
            .map(|i| {
                x = backbone.forward_layer(i, &x, false);
                x.size()
            })
            .collect()
    });
    assert_eq!(
        shapes,
        [
            vec![1, 128, 119, 119],
            vec![1, 256, 119, 119],
            vec![1, 512, 60, 60],
            vec![1, 1024, 60, 60],
            vec![1, 2048, 60, 60]
        ]
    );
    assert_eq!(backbone.out_channels(), [128, 256, 512, 1024, 2048]);
}

#[test]
fn without_svf_the_whole_backbone_is_frozen() {
    let vs = nn::VarStore::new(Device::Cpu);
    Backbone::new(&vs.root(), &small(18, false, 4)).unwrap();
    assert!(vs.trainable_variables().is_empty());
    assert!(vs.variables().values().all(|t| !t.requires_grad()));
}

#[test]
fn recomposed_weights_give_the_decomposed_outputs() {
    // Default rank multiple 4 truncates some convs: recomposing must reproduce the truncated model.
    let dir = scratch("recompose");
    tch::manual_seed(4);
    let config = Config {
        backbone_width: 0.3,
        ..small(18, true, 4)
    };
    let svf_vs = nn::VarStore::new(Device::Cpu);
    let decomposed = Backbone::new(&svf_vs.root(), &config).unwrap();
    randomize_batch_norm(&svf_vs);
    let weights = backbone::backbone_variables(&svf_vs);
    assert!(
        weights["layer0.0.vector_S"].size()[1] < 19,
        "stem should be truncated"
    );

    let fused = svf::svf::recompose(&weights);
    assert!(fused.contains_key("layer0.0.weight"));
    assert!(!fused.keys().any(|n| n.contains("vector_S")));
    let file = dir.join("decomposed.safetensors");
    backbone::write_weights(&weights, &file).unwrap();
    let full_config = Config {
        svf: false,
        ..config.clone()
    };
    let full_vs = nn::VarStore::new(Device::Cpu);
    let full = Backbone::new(&full_vs.root(), &full_config).unwrap();
    // As pretrained weights of a full-rank model, truncated factors are refused: recomposed, they
    // are not the weights a full-rank baseline starts from.
    let err = backbone::load_pretrained(&full_vs, &file, &full_config).unwrap_err();
    assert!(
        matches!(err, BackboneError::TruncatedFactors { .. }),
        "{err}"
    );
    let message = err.to_string();
    for needle in ["layer0.0: rank", "full-rank file", "svf: true"] {
        assert!(message.contains(needle), "{needle} not in {message}");
    }
    // The truncated model itself, recomposed into full-rank variables, computes the same.
    tch::no_grad(|| {
        for (name, var) in backbone::backbone_variables(&full_vs) {
            var.shallow_clone().copy_(&fused[&name]);
        }
    });
    for (stage, err) in stage_errors(&decomposed, &full, 65).iter().enumerate() {
        assert!(*err < 1e-4, "layer{stage}: {err}");
    }

    // Factors that keep every singular value are recomposed on load.
    let exact_config = Config {
        svf_rank_multiple: 1,
        ..config.clone()
    };
    let exact_vs = nn::VarStore::new(Device::Cpu);
    let decomposed = Backbone::new(&exact_vs.root(), &exact_config).unwrap();
    randomize_batch_norm(&exact_vs);
    let weights = backbone::backbone_variables(&exact_vs);
    let fused = svf::svf::recompose(&weights);
    backbone::write_weights(&weights, &file).unwrap();
    backbone::load_pretrained(&full_vs, &file, &full_config).unwrap();
    for (name, var) in backbone::backbone_variables(&full_vs) {
        assert!(
            rel_max_err(
                &var.to_kind(Kind::Double),
                &fused[&name].to_kind(Kind::Double)
            ) < 1e-6,
            "{name}"
        );
    }
    for (stage, err) in stage_errors(&decomposed, &full, 65).iter().enumerate() {
        assert!(*err < 1e-4, "layer{stage}: {err}");
    }
}

#[test]
fn decomposed_model_saves_and_reloads_bit_exactly() {
    let dir = scratch("reload");
    for config in [
        small(34, true, 4),
        Config {
            vgg: true,
            ..small(50, true, 4)
        },
    ] {
        tch::manual_seed(5);
        let vs = nn::VarStore::new(Device::Cpu);
        let backbone = Backbone::new(&vs.root(), &config).unwrap();
        randomize_batch_norm(&vs);
        // A training-mode pass moves the running statistics and the batch counter.
        let _ = tch::no_grad(|| {
            backbone.forward_layer(0, &Tensor::randn([2, 3, 33, 33], CPU_F32), true)
        });
        let file = dir.join("svf.safetensors");
        let saved = backbone::backbone_variables(&vs);
        backbone::write_weights(&saved, &file).unwrap();

        tch::manual_seed(6);
        let vs2 = nn::VarStore::new(Device::Cpu);
        Backbone::new(&vs2.root(), &config).unwrap();
        let report = backbone::load_pretrained(&vs2, &file, &config).unwrap();
        let loaded = backbone::backbone_variables(&vs2);
        assert_eq!(loaded.len(), saved.len());
        for (name, t) in &saved {
            assert_eq!(loaded[name].kind(), t.kind(), "{name}");
            assert!(loaded[name].equal(t), "{name}");
        }
        assert_eq!(loaded["layer0.1.num_batches_tracked"].int64_value(&[]), 8);
        assert!(report.layers.iter().all(|l| l.relative_error.is_none()));
        assert!(report.trainable_parameters > 0);
    }
}

#[test]
fn batch_norm_train_mode_updates_statistics_and_eval_mode_does_not() {
    let vs = nn::VarStore::new(Device::Cpu);
    let backbone = Backbone::new(&vs.root(), &small(18, false, 4)).unwrap();
    let mean = || vs.variables()["layer0.1.running_mean"].copy();
    let before = mean();
    let x = Tensor::randn([2, 3, 33, 33], CPU_F32) + 3.0;
    let _ = tch::no_grad(|| backbone.forward_layer(0, &x, false));
    assert!(mean().equal(&before));
    let _ = tch::no_grad(|| backbone.forward_layer(0, &x, true));
    assert!(!mean().equal(&before));
    assert_eq!(
        vs.variables()["layer0.1.num_batches_tracked"].int64_value(&[]),
        1
    );
}

/// Renames PFENet names to PSPNet's stem names and adds an ImageNet classifier.
fn to_pspnet_names(weights: &HashMap<String, Tensor>) -> Vec<(String, Tensor)> {
    let stem = [
        ("0", "conv1"),
        ("1", "bn1"),
        ("3", "conv2"),
        ("4", "bn2"),
        ("6", "conv3"),
        ("7", "bn3"),
    ];
    let mut out: Vec<(String, Tensor)> = weights
        .iter()
        .filter(|(name, _)| !name.ends_with("num_batches_tracked"))
        .map(|(name, t)| (name.clone(), t.shallow_clone()))
        .map(|(name, t)| match name.strip_prefix("layer0.") {
            Some(rest) => {
                let (position, leaf) = rest.split_once('.').unwrap();
                let module = stem.iter().find(|(p, _)| *p == position).unwrap().1;
                (format!("{module}.{leaf}"), t)
            }
            None => (name, t),
        })
        .collect();
    out.push(("fc.weight".into(), Tensor::zeros([10, 8], CPU_F32)));
    out.push(("fc.bias".into(), Tensor::zeros([10], CPU_F32)));
    out
}

fn write(entries: &[(String, Tensor)], path: &Path) {
    Tensor::write_safetensors(entries, path).unwrap();
}

#[test]
fn loading_maps_pspnet_and_torchvision_names_and_is_strict() {
    let dir = scratch("strict");
    tch::manual_seed(7);
    let config = small(18, false, 4);
    let source_vs = nn::VarStore::new(Device::Cpu);
    Backbone::new(&source_vs.root(), &config).unwrap();
    randomize_batch_norm(&source_vs);
    let source = backbone::backbone_variables(&source_vs);

    // PSPNet names, no num_batches_tracked, an fc classifier: loads and equals the source.
    let psp = dir.join("psp.safetensors");
    write(&to_pspnet_names(&source), &psp);
    let vs = nn::VarStore::new(Device::Cpu);
    Backbone::new(&vs.root(), &config).unwrap();
    backbone::load_pretrained(&vs, &psp, &config).unwrap();
    for (name, var) in backbone::backbone_variables(&vs) {
        if !name.ends_with("num_batches_tracked") {
            assert!(var.equal(&source[&name]), "{name}");
        }
    }

    // Missing, unexpected and misshapen entries are all named.
    let mut broken = to_pspnet_names(&source);
    broken.retain(|(n, _)| n != "layer2.0.conv1.weight");
    broken.push(("layer9.extra".into(), Tensor::zeros([3], CPU_F32)));
    for (name, t) in broken.iter_mut() {
        if name == "layer1.0.bn1.weight" {
            *t = Tensor::zeros([3], CPU_F32);
        }
    }
    let bad = dir.join("broken.safetensors");
    write(&broken, &bad);
    let err = backbone::load_pretrained(&vs, &bad, &config).unwrap_err();
    assert!(matches!(err, BackboneError::Mismatch { .. }));
    let message = err.to_string();
    for needle in [
        "layer2.0.conv1.weight",
        "layer9.extra",
        "layer1.0.bn1.weight",
        "broken.safetensors",
        "missing (1)",
        "unexpected (1)",
    ] {
        assert!(message.contains(needle), "{needle} not in {message}");
    }

    // A ResNet-34 file does not load into a ResNet-18.
    let r34_vs = nn::VarStore::new(Device::Cpu);
    Backbone::new(&r34_vs.root(), &small(34, false, 4)).unwrap();
    let r34 = dir.join("r34.safetensors");
    backbone::write_weights(&backbone::backbone_variables(&r34_vs), &r34).unwrap();
    let message = backbone::load_pretrained(&vs, &r34, &config)
        .unwrap_err()
        .to_string();
    assert!(message.contains("layer1.2.conv1.weight"), "{message}");

    let err = backbone::load_pretrained(&vs, &dir.join("absent.safetensors"), &config).unwrap_err();
    let message = err.to_string();
    assert!(
        message.contains("does not exist (from config key `backbone_weights`)"),
        "{message}"
    );
    // A file that is not safetensors (a .pth, say) points at the converter.
    let pth = dir.join("resnet50_v2.pth");
    std::fs::write(&pth, b"PK\x03\x04 a zip archive").unwrap();
    let message = backbone::load_pretrained(&vs, &pth, &config)
        .unwrap_err()
        .to_string();
    assert!(message.contains("convert_weights.py"), "{message}");
}

#[test]
fn vgg_loads_torchvision_feature_indices() {
    let dir = scratch("vgg");
    let config = Config {
        vgg: true,
        ..small(50, false, 4)
    };
    let source_vs = nn::VarStore::new(Device::Cpu);
    Backbone::new(&source_vs.root(), &config).unwrap();
    randomize_batch_norm(&source_vs);
    let source = backbone::backbone_variables(&source_vs);
    let starts = [0, 7, 14, 24, 34];
    let mut entries: Vec<(String, Tensor)> = source
        .iter()
        .map(|(name, t)| {
            let mut parts = name.splitn(3, '.');
            let stage: usize = parts.next().unwrap()["layer".len()..].parse().unwrap();
            let position: usize = parts.next().unwrap().parse().unwrap();
            let leaf = parts.next().unwrap();
            (
                format!("features.{}.{leaf}", starts[stage] + position),
                t.shallow_clone(),
            )
        })
        .collect();
    assert!(entries.iter().any(|(n, _)| n == "features.41.running_var"));
    entries.push(("classifier.0.weight".into(), Tensor::zeros([4, 4], CPU_F32)));
    let file = dir.join("vgg.safetensors");
    write(&entries, &file);
    let vs = nn::VarStore::new(Device::Cpu);
    Backbone::new(&vs.root(), &config).unwrap();
    backbone::load_pretrained(&vs, &file, &config).unwrap();
    for (name, var) in backbone::backbone_variables(&vs) {
        assert!(var.equal(&source[&name]), "{name}");
    }
}

#[test]
fn svf_decompose_command_writes_loadable_weights_and_a_table() {
    let dir = scratch("command");
    tch::manual_seed(8);
    let config = small(18, false, 4);
    let vs = nn::VarStore::new(Device::Cpu);
    Backbone::new(&vs.root(), &config).unwrap();
    let input = dir.join("full.safetensors");
    write(&to_pspnet_names(&backbone::backbone_variables(&vs)), &input);
    let config_file = dir.join("config.yaml");
    std::fs::write(&config_file, "layers: 18\nbackbone_width: 0.25\n").unwrap();
    let output = dir.join("svf.safetensors");
    let result = Command::new(env!("CARGO_BIN_EXE_svf-decompose"))
        .args([
            "--weights",
            input.to_str().unwrap(),
            "--out",
            output.to_str().unwrap(),
        ])
        .args([
            "--config",
            config_file.to_str().unwrap(),
            "--set",
            "svf_exclude=[layer4]",
        ])
        .args(["--device", "cpu"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&result.stdout);
    assert!(
        result.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&result.stderr)
    );
    for needle in ["full rank", "rel. error", "layer0.0 ", "trainable (SVF):"] {
        assert!(stdout.contains(needle), "{needle} not in {stdout}");
    }
    assert!(!stdout.contains("layer4.0.conv1 "), "{stdout}");

    let svf_config = Config {
        svf: true,
        svf_exclude: vec!["layer4".into()],
        ..config
    };
    let svf_vs = nn::VarStore::new(Device::Cpu);
    Backbone::new(&svf_vs.root(), &svf_config).unwrap();
    backbone::load_pretrained(&svf_vs, &output, &svf_config).unwrap();
    assert!(svf_vs.variables().contains_key("layer4.0.conv1.weight"));
}

/// The conv and the reference's SVD conv computed by PyTorch, compared with ours.
#[test]
fn pytorch_cross_check_of_conv_and_reference_svd_conv() {
    let python = common::venv_python();
    let dir = scratch("pytorch");
    tch::manual_seed(9);
    // name → (weight, bias, stride, padding, dilation)
    let convs = [
        ("stem", Tensor::randn([64, 3, 3, 3], CPU_F32), None, 2, 1, 1),
        (
            "dilated",
            Tensor::randn([10, 3, 3, 3], CPU_F32),
            Some(Tensor::randn([10], CPU_F32)),
            1,
            2,
            2,
        ),
    ];
    let x = Tensor::randn([2, 3, 17, 17], CPU_F32);
    let mut entries = vec![("x".to_string(), x.shallow_clone())];
    for (name, weight, bias, ..) in &convs {
        entries.push((format!("{name}.weight"), weight.shallow_clone()));
        if let Some(bias) = bias {
            entries.push((format!("{name}.bias"), bias.shallow_clone()));
        }
    }
    let input = dir.join("in.safetensors");
    let output = dir.join("out.safetensors");
    write(&entries, &input);
    let script = r#"
import sys
from math import floor
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
t = load_file(sys.argv[1])
geometry = {"stem": (2, 1, 1), "dilated": (1, 2, 2)}
out = {}
for name, (stride, padding, dilation) in geometry.items():
    w, b = t[name + ".weight"], t.get(name + ".bias")
    out[name + ".full"] = F.conv2d(t["x"], w, b, stride, padding, dilation)
    # svf.py: rank rule with base 4, torch.svd, conv_U(conv_V(x) * vector_S)
    full = min(w.shape[0], w[0].numel())
    r = min(max(floor(floor(full * 1.0) / 4) * 4, 1), full)
    U, S, V = torch.svd(w.reshape(w.shape[0], -1))
    conv_v = V[:, :r].t().reshape(r, *w.shape[1:])
    conv_u = U[:, :r].reshape(w.shape[0], r, 1, 1)
    h = F.conv2d(t["x"], conv_v, None, stride, padding, dilation) * S[:r].reshape(1, r, 1, 1)
    out[name + ".svd"] = F.conv2d(h, conv_u, b)
    out[name + ".rank"] = torch.tensor(r)
save_file({k: v.contiguous() for k, v in out.items()}, sys.argv[2])
"#;
    common::run_ok(Command::new(&python).args([
        "-c",
        script,
        input.to_str().unwrap(),
        output.to_str().unwrap(),
    ]));
    let theirs: HashMap<String, Tensor> = Tensor::read_safetensors(&output)
        .unwrap()
        .into_iter()
        .collect();
    let options = SvfOptions::default();
    for (name, weight, bias, stride, padding, dilation) in &convs {
        let geometry = ConvGeometry {
            stride: *stride,
            padding: *padding,
            dilation: *dilation,
        };
        let full = geometry.conv2d(&x, weight, bias.as_ref());
        let err = rel_max_err(&full, &theirs[&format!("{name}.full")]);
        assert!(err < 1e-5, "{name} full: {err}");
        let rank = options.rank_for(name, &weight.size()).unwrap();
        assert_eq!(
            rank,
            theirs[&format!("{name}.rank")].int64_value(&[]),
            "{name}"
        );
        let factors = decompose_conv(weight, rank);
        let svd = SvdConv2d {
            conv_v: factors.v,
            vector_s: factors.s,
            conv_u: factors.u,
            conv_u_bias: bias.as_ref().map(Tensor::shallow_clone),
            geometry,
        };
        let err = rel_max_err(&svd.forward(&x), &theirs[&format!("{name}.svd")]);
        assert!(err < 1e-4, "{name} svd: {err}");
    }
    // The stem is truncated to 24 of 27: its SVD form differs from the full conv.
    assert_eq!(theirs["stem.rank"].int64_value(&[]), 24);
    assert!(rel_max_err(&theirs["stem.svd"], &theirs["stem.full"]) > 1e-3);
}

/// The backbones rebuilt in PyTorch from the reference's module structure (PSPNet's ResNet with
/// PFENet's dilation loop, torchvision's VGG16-BN split by `get_vgg16_layer`, `svf.py`'s
/// `SVD_Conv2d`): our weights must load with `strict=True` and give the same stage outputs.
const PYTORCH_BACKBONE: &str = r#"
import sys
import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

class SVD_Conv2d(nn.Module):  # svf.py
    def __init__(self, conv, rank):
        super().__init__()
        self.conv_U = nn.Conv2d(rank, conv.out_channels, 1, 1, 0, 1, 1, conv.bias is not None)
        self.conv_V = nn.Conv2d(conv.in_channels, rank, conv.kernel_size, conv.stride, conv.padding, conv.dilation, 1, False)
        self.vector_S = nn.Parameter(torch.empty((1, rank, 1, 1)))
    def forward(self, x):
        return self.conv_U(self.conv_V(x).mul(self.vector_S))

class Block(nn.Module):  # PSPNet's BasicBlock / Bottleneck
    def __init__(self, bottleneck, inplanes, planes, stride, downsample):
        super().__init__()
        self.expansion = 4 if bottleneck else 1
        if bottleneck:
            self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
            self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
            self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
            self.bn3 = nn.BatchNorm2d(planes * 4)
        else:
            self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
            self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn1, self.bn2 = nn.BatchNorm2d(planes), nn.BatchNorm2d(planes)
        self.downsample, self.bottleneck = downsample, bottleneck
    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.bottleneck:
            out = self.bn3(self.conv3(torch.relu(out)))
        residual = x if self.downsample is None else self.downsample(x)
        return torch.relu(out + residual)

def scaled(c, width):
    return max(4, int(c * width + 0.5))

def resnet(layers, width):
    bottleneck = layers >= 50
    blocks = {18: [2, 2, 2, 2], 34: [3, 4, 6, 3], 50: [3, 4, 6, 3], 101: [3, 4, 23, 3]}[layers]
    c64, c128 = scaled(64, width), scaled(128, width)
    conv = lambda i, o, s: nn.Conv2d(i, o, 3, s, 1, bias=False)
    stages = [nn.Sequential(conv(3, c64, 2), nn.BatchNorm2d(c64), nn.ReLU(), conv(c64, c64, 1), nn.BatchNorm2d(c64), nn.ReLU(),
                            conv(c64, c128, 1), nn.BatchNorm2d(c128), nn.ReLU(), nn.MaxPool2d(3, 2, 1))]
    inplanes, expansion = c128, 4 if bottleneck else 1
    for index, n in enumerate(blocks):
        planes, stride = scaled(64 << index, width), 1 if index == 0 else 2
        downsample = None
        if stride != 1 or inplanes != planes * expansion:
            downsample = nn.Sequential(nn.Conv2d(inplanes, planes * expansion, 1, stride, bias=False), nn.BatchNorm2d(planes * expansion))
        mods = [Block(bottleneck, inplanes, planes, stride, downsample)]
        inplanes = planes * expansion
        mods += [Block(bottleneck, inplanes, planes, 1, None) for _ in range(1, n)]
        stages.append(nn.Sequential(*mods))
    for stage, d in ((stages[3], 2), (stages[4], 4)):  # PFENet's dilation loop
        for n, m in stage.named_modules():
            dilate = 'conv2' in n if bottleneck else ('conv' in n and isinstance(m, nn.Conv2d))
            if dilate:
                m.dilation, m.padding, m.stride = (d, d), (d, d), (1, 1)
            elif 'downsample.0' in n:
                m.stride = (1, 1)
    return stages

def vgg(width):
    features, cin = [], 3
    for v in [64, 64, 'M', 128, 128, 'M', 256, 256, 256, 'M', 512, 512, 512, 'M', 512, 512, 512, 'M']:
        if v == 'M':
            features.append(nn.MaxPool2d(2, 2, ceil_mode=True))
        else:
            v = scaled(v, width)
            features += [nn.Conv2d(cin, v, 3, padding=1), nn.BatchNorm2d(v), nn.ReLU()]
            cin = v
    return [nn.Sequential(*features[a:b]) for a, b in ((0, 7), (7, 14), (14, 24), (24, 34), (34, 43))]

def decompose(module, weights, prefix):
    for name, child in module.named_children():
        full = prefix + name
        if isinstance(child, nn.Conv2d) and full + '.vector_S' in weights:
            setattr(module, name, SVD_Conv2d(child, weights[full + '.vector_S'].shape[1]))
        else:
            decompose(child, weights, full + '.')

for case in sys.argv[1:]:
    arch, width, path_in, path_out = case.split(',')
    weights = load_file(path_in)
    x = weights.pop('x')
    model = nn.Module()
    stages = vgg(float(width)) if arch == 'vgg' else resnet(int(arch), float(width))
    for i, stage in enumerate(stages):
        setattr(model, 'layer%d' % i, stage)
    decompose(model, weights, '')
    model.load_state_dict(weights, strict=True)
    model.eval()
    out = {}
    with torch.no_grad():
        for i, stage in enumerate(stages):
            x = stage(x)
            out['layer%d' % i] = x.contiguous()
    save_file(out, path_out)
"#;

#[test]
fn pytorch_cross_check_of_whole_backbones() {
    let python = common::venv_python();
    let dir = scratch("pytorch-backbones");
    tch::manual_seed(10);
    let cases = [
        ("18", small(18, false, 4)),
        ("50", small(50, true, 4)),
        (
            "vgg",
            Config {
                vgg: true,
                ..small(50, true, 4)
            },
        ),
    ];
    let x = Tensor::randn([2, 3, 65, 65], CPU_F32);
    let mut args = Vec::new();
    let mut models = Vec::new();
    for (index, (arch, config)) in cases.iter().enumerate() {
        let vs = nn::VarStore::new(Device::Cpu);
        let backbone = Backbone::new(&vs.root(), config).unwrap();
        randomize_batch_norm(&vs);
        let mut weights = backbone::backbone_variables(&vs);
        weights.insert("x".into(), x.shallow_clone());
        let (input, output) = (
            dir.join(format!("in{index}.safetensors")),
            dir.join(format!("out{index}.safetensors")),
        );
        backbone::write_weights(&weights, &input).unwrap();
        args.push(format!(
            "{arch},{},{},{}",
            config.backbone_width,
            input.display(),
            output.display()
        ));
        models.push((vs, backbone, output));
    }
    common::run_ok(
        Command::new(&python)
            .arg("-c")
            .arg(PYTORCH_BACKBONE)
            .args(&args),
    );
    for ((arch, _), (_vs, backbone, output)) in cases.iter().zip(&models) {
        let theirs: HashMap<String, Tensor> = Tensor::read_safetensors(output)
            .unwrap()
            .into_iter()
            .collect();
        let mut h = x.shallow_clone();
        for stage in 0..5 {
            h = tch::no_grad(|| backbone.forward_layer(stage, &h, false));
            let expected = &theirs[&format!("layer{stage}")];
            assert_eq!(h.size(), expected.size(), "{arch} layer{stage}");
            let err = rel_max_err(&h, expected);
            assert!(err < 1e-4, "{arch} layer{stage}: {err}");
        }
    }
}

/// Runs `svf-decompose` on a small ResNet-18 config with `args` added.
fn svf_decompose(config_file: &Path, args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_svf-decompose"))
        .args(["--config", config_file.to_str().unwrap(), "--device", "cpu"])
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn svf_decompose_never_replaces_its_input_and_replaces_an_output_only_when_told() {
    let dir = scratch("decompose_output");
    let config = small(18, false, 4);
    let vs = nn::VarStore::new(Device::Cpu);
    Backbone::new(&vs.root(), &config).unwrap();
    let input = dir.join("full.safetensors");
    write(&to_pspnet_names(&backbone::backbone_variables(&vs)), &input);
    let original = std::fs::read(&input).unwrap();
    let link = dir.join("link.safetensors");
    std::os::unix::fs::symlink(&input, &link).unwrap();
    let other_spelling = dir.join(".").join("full.safetensors");
    for out in [&input, &link, &other_spelling] {
        // Refused even with --overwrite: the decomposition is lossy.
        let err =
            backbone::decompose_pretrained(&input, out, true, &config, Device::Cpu).unwrap_err();
        assert!(
            matches!(err, BackboneError::OutputIsInput { .. }),
            "{}: {err}",
            out.display()
        );
    }
    assert_eq!(std::fs::read(&input).unwrap(), original);

    let config_file = dir.join("config.yaml");
    std::fs::write(&config_file, "layers: 18\nbackbone_width: 0.25\n").unwrap();
    let output = dir.join("svf.safetensors");
    std::fs::write(&output, b"earlier results").unwrap();
    let (weights, out) = (input.to_str().unwrap(), output.to_str().unwrap());
    let refused = svf_decompose(&config_file, &["--weights", weights, "--out", out]);
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success());
    assert!(stderr.contains("--overwrite"), "{stderr}");
    assert_eq!(std::fs::read(&output).unwrap(), b"earlier results");

    let replaced = svf_decompose(
        &config_file,
        &["--weights", weights, "--out", out, "--overwrite"],
    );
    assert!(
        replaced.status.success(),
        "{}",
        String::from_utf8_lossy(&replaced.stderr)
    );
    let svf_config = Config {
        svf: true,
        ..config
    };
    let svf_vs = nn::VarStore::new(Device::Cpu);
    Backbone::new(&svf_vs.root(), &svf_config).unwrap();
    backbone::load_pretrained(&svf_vs, &output, &svf_config).unwrap();
    let mut left: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    left.sort();
    assert_eq!(
        left,
        [
            "config.yaml",
            "full.safetensors",
            "link.safetensors",
            "svf.safetensors"
        ]
    );
}

#[test]
fn svf_decompose_checks_the_svf_prefixes_like_training() {
    let dir = scratch("decompose_prefixes");
    let config = small(18, false, 4);
    let vs = nn::VarStore::new(Device::Cpu);
    Backbone::new(&vs.root(), &config).unwrap();
    let input = dir.join("full.safetensors");
    write(&to_pspnet_names(&backbone::backbone_variables(&vs)), &input);
    let output = dir.join("svf.safetensors");
    for (exclude, ratios) in [
        (vec!["layer9".to_string()], vec![]),
        (vec![], vec![("layr3".to_string(), 0.5)]),
    ] {
        let config = Config {
            svf_exclude: exclude,
            svf_layer_ratios: ratios.into_iter().collect(),
            ..config.clone()
        };
        let err = backbone::decompose_pretrained(&input, &output, false, &config, Device::Cpu)
            .unwrap_err();
        assert!(matches!(err, BackboneError::UnknownSvfPrefix(_)), "{err}");
        assert!(err.to_string().contains("names no convolution"), "{err}");
        assert!(!output.exists());
    }
}

#[test]
fn weights_no_config_key_can_fit_say_which_file_to_give() {
    let dir = scratch("advice");
    let config = small(18, false, 4);
    let source_vs = nn::VarStore::new(Device::Cpu);
    Backbone::new(&source_vs.root(), &config).unwrap();
    let source = backbone::backbone_variables(&source_vs);

    // torchvision's ResNet: one 7x7 stem conv instead of PSPNet's three 3x3.
    let mut torchvision: Vec<(String, Tensor)> = to_pspnet_names(&source)
        .into_iter()
        .filter(|(n, _)| {
            !["conv2.", "bn2.", "conv3.", "bn3."]
                .iter()
                .any(|p| n.starts_with(p))
        })
        .collect();
    for (name, t) in torchvision.iter_mut() {
        if name == "conv1.weight" {
            *t = Tensor::zeros([16, 3, 7, 7], CPU_F32);
        }
    }
    let file = dir.join("resnet18_torchvision.safetensors");
    write(&torchvision, &file);
    for svf in [false, true] {
        let config = Config {
            svf,
            ..config.clone()
        };
        let vs = nn::VarStore::new(Device::Cpu);
        Backbone::with_init(&vs.root(), &config, backbone::Init::Zeros).unwrap();
        let message = backbone::load_pretrained(&vs, &file, &config)
            .unwrap_err()
            .to_string();
        for needle in [
            "7x7",
            "resnet50_v2",
            "README \"Pretrained weights\"",
            "layer0.0.weight",
        ] {
            assert!(
                message.contains(needle),
                "svf {svf}: {needle} not in {message}"
            );
        }
        assert!(!message.contains("check the keys"), "{message}");
    }

    // A whole PFENet model: its head's names as in the file, and where such a file goes.
    let mut whole: Vec<(String, Tensor)> = source
        .iter()
        .map(|(n, t)| (n.clone(), t.shallow_clone()))
        .collect();
    whole.push((
        "down_query.0.weight".into(),
        Tensor::zeros([8, 24, 1, 1], CPU_F32),
    ));
    whole.push(("cls.3.bias".into(), Tensor::zeros([2], CPU_F32)));
    let file = dir.join("pfenet_model.safetensors");
    write(&whole, &file);
    let svf_config = Config {
        svf: true,
        ..config.clone()
    };
    let vs = nn::VarStore::new(Device::Cpu);
    Backbone::with_init(&vs.root(), &svf_config, backbone::Init::Zeros).unwrap();
    let message = backbone::load_pretrained(&vs, &file, &svf_config)
        .unwrap_err()
        .to_string();
    for needle in [
        "down_query.0.weight",
        "cls.3.bias",
        "unexpected (2)",
        "`weight:`",
    ] {
        assert!(message.contains(needle), "{needle} not in {message}");
    }
    assert!(!message.contains("conv_U"), "{message}");
}

#[test]
fn convert_weights_refuses_pickled_modules_and_unwraps_a_nested_state_dict() {
    let dir = scratch("convert");
    let python = common::venv_python();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/convert_weights.py");
    common::run_python(
        "import sys, torch\n\
         m = torch.nn.Conv2d(3, 4, 3)\n\
         torch.save(m, sys.argv[1] + '/module.pth')\n\
         torch.save({'model': m.state_dict(), 'epoch': 3,\n\
                     'optimizer': {'state': {}, 'param_groups': []}}, sys.argv[1] + '/nested.pth')\n\
         torch.save({'model': m.state_dict(), 'ema': m.state_dict()}, sys.argv[1] + '/two.pth')\n",
        &[&dir],
    );
    let convert = |name: &str| {
        Command::new(&python)
            .arg(&script)
            .arg(dir.join(format!("{name}.pth")))
            .arg(dir.join(format!("{name}.safetensors")))
            .output()
            .unwrap()
    };
    let refused = convert("module");
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success());
    assert!(stderr.contains("model.state_dict()"), "{stderr}");
    assert!(!stderr.contains("Traceback"), "{stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(!dir.join("module.safetensors").exists());

    let nested = convert("nested");
    assert!(
        nested.status.success(),
        "{}",
        String::from_utf8_lossy(&nested.stderr)
    );
    let mut names: Vec<String> = Tensor::read_safetensors(dir.join("nested.safetensors"))
        .unwrap()
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    names.sort();
    assert_eq!(names, ["bias", "weight"]);

    let two = convert("two");
    let stderr = String::from_utf8_lossy(&two.stderr);
    assert!(!two.status.success());
    assert!(
        stderr.contains("'model'") && stderr.contains("'ema'"),
        "{stderr}"
    );
}
