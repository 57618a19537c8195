//! Strict loading of whole-model weights into a var store: every variable named exactly as the
//! model's, every shape equal, nothing copied unless everything matches. Checkpoints, `svf-eval`'s
//! `--weights` and the fused inference model go through here; the backbone's lenient loading of
//! ImageNet files (other naming schemes, no BatchNorm counters) is `backbone::load_pretrained`.

use std::collections::BTreeMap;
use std::path::Path;

use tch::{nn, Tensor};

use super::ModelError;
use crate::backbone::WeightMismatch;

/// Every variable of `vs` (parameters and buffers) by PyTorch name, sorted by name.
pub fn model_weights(vs: &nn::VarStore) -> Vec<(String, Tensor)> {
    let sorted: BTreeMap<String, Tensor> = vs.variables().into_iter().collect();
    sorted.into_iter().collect()
}

/// Copies `weights` into the variables of `vs`, strictly (see the module documentation). `origin`
/// names the file in errors.
pub fn copy_into(
    vs: &nn::VarStore,
    weights: &[(String, Tensor)],
    origin: &Path,
) -> Result<(), ModelError> {
    copy_into_part(vs, weights, origin, |_| true)
}

/// [`copy_into`] for the part of `vs` whose variable names `part` holds for (BAM's base learner
/// inside BAM): `weights` must match exactly those variables.
pub fn copy_into_part(
    vs: &nn::VarStore,
    weights: &[(String, Tensor)],
    origin: &Path,
    part: impl Fn(&str) -> bool,
) -> Result<(), ModelError> {
    let mut variables = vs.variables();
    variables.retain(|name, _| part(name));
    let given = weights
        .iter()
        .map(|(n, t)| (n.clone(), t.shallow_clone()))
        .collect();
    if let Some(mismatch) = WeightMismatch::between(&variables, &given, |_| false) {
        return Err(ModelError::Mismatch {
            path: origin.to_path_buf(),
            mismatch,
        });
    }
    tch::no_grad(|| {
        for (name, tensor) in weights {
            let variable = variables.get_mut(name).expect("names were checked");
            variable
                .f_copy_(tensor)
                .map_err(|source| ModelError::Copy {
                    path: origin.to_path_buf(),
                    name: name.clone(),
                    source,
                })?;
        }
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind};

    #[test]
    fn copy_into_is_strict_about_names_and_shapes() {
        let vs = tch::nn::VarStore::new(Device::Cpu);
        let root = vs.root();
        let _w = root.zeros("weight", &[2, 3]);
        let _b = root.zeros_no_train("running_mean", &[3]);
        let origin = Path::new("w.safetensors");
        let good = vec![
            (
                "weight".to_string(),
                Tensor::ones([2, 3], (Kind::Float, Device::Cpu)),
            ),
            (
                "running_mean".to_string(),
                Tensor::ones([3], (Kind::Float, Device::Cpu)),
            ),
        ];
        copy_into(&vs, &good, origin).unwrap();
        let sum: f64 = model_weights(&vs)
            .iter()
            .map(|(_, t)| t.sum(Kind::Float).double_value(&[]))
            .sum();
        assert_eq!(sum, 9.0);
        let err = copy_into(&vs, &good[..1], origin).unwrap_err().to_string();
        assert!(
            err.contains("running_mean") && err.contains("w.safetensors"),
            "{err}"
        );
        let mut extra: Vec<(String, Tensor)> = good
            .iter()
            .map(|(n, t)| (n.clone(), t.shallow_clone()))
            .collect();
        extra.push((
            "head.weight".to_string(),
            Tensor::ones([1], (Kind::Float, Device::Cpu)),
        ));
        let err = copy_into(&vs, &extra, origin).unwrap_err().to_string();
        assert!(
            err.contains("unexpected") && err.contains("head.weight"),
            "{err}"
        );
        let wrong = vec![
            (
                "weight".to_string(),
                Tensor::ones([3, 2], (Kind::Float, Device::Cpu)),
            ),
            (
                "running_mean".to_string(),
                Tensor::ones([3], (Kind::Float, Device::Cpu)),
            ),
        ];
        let err = copy_into(&vs, &wrong, origin).unwrap_err().to_string();
        assert!(err.contains("weight file [3, 2] vs model [2, 3]"), "{err}");
    }
}
