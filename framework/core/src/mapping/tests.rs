//! Unit tests of the mapping engine on hand-made tables.

use super::*;
use mlx_rs::Array;
use std::collections::BTreeMap;

fn meta(shape: &[i64]) -> TensorMeta {
    TensorMeta {
        shape: shape.to_vec(),
        dtype: "F32".into(),
    }
}

fn names(pairs: &[(&str, &[i64])]) -> BTreeMap<String, TensorMeta> {
    pairs
        .iter()
        .map(|(n, s)| (n.to_string(), meta(s)))
        .collect()
}

fn shapes(pairs: &[(&str, &[i64])]) -> BTreeMap<String, Vec<i64>> {
    pairs
        .iter()
        .map(|(n, s)| (n.to_string(), s.to_vec()))
        .collect()
}

fn arange(shape: &[i32]) -> Array {
    let n: i32 = shape.iter().product();
    Array::from_iter((0..n).map(|v| v as f32), shape)
}

#[test]
fn rename_drop_missing_unexpected_and_shape_mismatch() {
    let table = MappingTable::from_rules(vec![
        Rule::rename(
            "layers.{L}.attention.wq.weight",
            "model.layers.{L}.q.weight",
        ),
        Rule::drop("layers.{L}.rotary.inv_freq", "recomputed"),
    ]);
    let plan = table.plan(
        &names(&[
            ("layers.0.attention.wq.weight", &[4, 4]),
            ("layers.1.attention.wq.weight", &[4, 3]),
            ("layers.0.rotary.inv_freq", &[2]),
            ("stray", &[1]),
        ]),
        &shapes(&[
            ("model.layers.0.q.weight", &[4, 4]),
            ("model.layers.1.q.weight", &[4, 4]),
            ("model.norm.weight", &[4]),
        ]),
    );
    let r = &plan.report;
    assert_eq!(r.mapped.len(), 2);
    assert_eq!(r.dropped[0].tensor, "layers.0.rotary.inv_freq");
    assert_eq!(r.missing, vec!["model.norm.weight"]);
    assert_eq!(r.unexpected, vec!["stray"]);
    assert_eq!(r.shape_mismatches.len(), 1);
    assert_eq!(r.shape_mismatches[0].parameter, "model.layers.1.q.weight");
    assert_eq!(r.shape_mismatches[0].found, vec![4, 3]);
    assert!(!r.is_clean());
    assert!(r.problems(5).contains("model.norm.weight"));
}

#[test]
fn tie_fills_an_absent_parameter_only() {
    let table = MappingTable::from_rules(vec![
        Rule::keep("embed.weight"),
        Rule::keep("lm_head.weight"),
        Rule::tie("lm_head.weight", "embed.weight"),
    ]);
    let expected = shapes(&[("embed.weight", &[8, 4]), ("lm_head.weight", &[8, 4])]);
    let tied = table.plan(&names(&[("embed.weight", &[8, 4])]), &expected);
    assert!(tied.report.is_clean());
    assert_eq!(tied.report.tied[0].parameter, "lm_head.weight");
    let untied = table.plan(
        &names(&[("embed.weight", &[8, 4]), ("lm_head.weight", &[8, 4])]),
        &expected,
    );
    assert!(untied.report.tied.is_empty());
    let out = tied.execute(|_| Ok(arange(&[8, 4]))).unwrap();
    assert_eq!(out["lm_head.weight"].shape(), &[8, 4]);
}

#[test]
fn split_and_refuse_round_trip() {
    let table = MappingTable::from_rules(vec![Rule::split(
        "h.{L}.qkv.weight",
        &[
            ("l.{L}.q.weight", 4),
            ("l.{L}.k.weight", 2),
            ("l.{L}.v.weight", 2),
        ],
        0,
    )]);
    let plan = table.plan(
        &names(&[("h.0.qkv.weight", &[8, 3])]),
        &shapes(&[
            ("l.0.q.weight", &[4, 3]),
            ("l.0.k.weight", &[2, 3]),
            ("l.0.v.weight", &[2, 3]),
        ]),
    );
    assert!(plan.report.is_clean(), "{:?}", plan.report);
    assert_eq!(plan.report.transformed[0].op, "split(axis 0: 4, 2, 2)");
    let fused = arange(&[8, 3]);
    let params = plan.execute(|_| Ok(fused.clone())).unwrap();
    assert_eq!(
        params["l.0.k.weight"].as_slice::<f32>(),
        &[12.0, 13.0, 14.0, 15.0, 16.0, 17.0]
    );
    let back = table.export(&params).unwrap();
    assert_eq!(back.len(), 1);
    assert_eq!(
        back["h.0.qkv.weight"].as_slice::<f32>(),
        fused.as_slice::<f32>()
    );
}

#[test]
fn split_with_wrong_sizes_is_a_shape_mismatch() {
    let table = MappingTable::from_rules(vec![Rule::split("qkv", &[("q", 4), ("k", 4)], 0)]);
    let plan = table.plan(
        &names(&[("qkv", &[6, 2])]),
        &shapes(&[("q", &[4, 2]), ("k", &[4, 2])]),
    );
    assert_eq!(plan.report.shape_mismatches.len(), 2);
}

#[test]
fn stack_experts_and_unstack() {
    let table = MappingTable::from_rules(vec![Rule::stack(
        "l.{L}.experts.{E}.w1.weight",
        "l.{L}.switch.w1.weight",
        3,
    )]);
    let ckpt = names(&[
        ("l.0.experts.0.w1.weight", &[2, 2]),
        ("l.0.experts.1.w1.weight", &[2, 2]),
        ("l.0.experts.2.w1.weight", &[2, 2]),
    ]);
    let plan = table.plan(&ckpt, &shapes(&[("l.0.switch.w1.weight", &[3, 2, 2])]));
    assert!(plan.report.is_clean(), "{:?}", plan.report);
    let params = plan
        .execute(|name| {
            let e = name.split('.').nth(3).unwrap().parse::<f32>().unwrap();
            Ok(Array::from_slice(&[e, e, e, e], &[2, 2]))
        })
        .unwrap();
    assert_eq!(params["l.0.switch.w1.weight"].shape(), &[3, 2, 2]);
    let back = table.export(&params).unwrap();
    assert_eq!(back["l.0.experts.2.w1.weight"].as_slice::<f32>(), &[2.0; 4]);
    assert_eq!(back.len(), 3);

    let partial = table.plan(
        &names(&[("l.0.experts.0.w1.weight", &[2, 2])]),
        &shapes(&[("l.0.switch.w1.weight", &[3, 2, 2])]),
    );
    assert!(partial
        .report
        .missing
        .iter()
        .any(|m| m.contains("experts.2")));
}

#[test]
fn rotary_permutation_inverts() {
    let t = Transform::RotaryInterleavedToHalves { heads: 2 };
    let w = arange(&[8, 3]);
    let halves = t.apply(&w).unwrap();
    // Head 0 rows interleaved (0,1,2,3) -> halves (0,2,1,3).
    assert_eq!(
        &halves.as_slice::<f32>()[..6],
        &[0.0, 1.0, 2.0, 6.0, 7.0, 8.0]
    );
    let back = t.invert(&halves).unwrap();
    assert_eq!(back.as_slice::<f32>(), w.as_slice::<f32>());
    assert!(t.apply(&arange(&[6, 3])).is_err());
}

/// A plugin's transform: the checkpoint stores `weight - 1` (as Gemma's
/// norms do), the model wants the scale itself.
#[derive(Debug)]
struct AddOne;

impl TensorTransform for AddOne {
    fn apply(&self, tensor: &Array) -> crate::Result<Array> {
        Ok(tensor.add(Array::from_f32(1.0))?)
    }
    fn invert(&self, tensor: &Array) -> crate::Result<Array> {
        Ok(tensor.subtract(Array::from_f32(1.0))?)
    }
    fn describe(&self) -> String {
        "weight + 1".into()
    }
}

#[test]
fn a_plugin_transform_loads_reports_and_exports_back() {
    let table = MappingTable::from_rules(vec![Rule::transform(
        "ck.{L}.norm",
        "m.{L}.norm",
        Transform::custom(AddOne),
    )]);
    let plan = table.plan(
        &names(&[("ck.0.norm", &[4])]),
        &shapes(&[("m.0.norm", &[4])]),
    );
    assert!(plan.report.is_clean(), "{:?}", plan.report);
    assert_eq!(plan.report.transformed[0].op, "weight + 1");
    let stored = arange(&[4]);
    let params = plan.execute(|_| Ok(stored.clone())).unwrap();
    assert_eq!(params["m.0.norm"].as_slice::<f32>(), &[1.0, 2.0, 3.0, 4.0]);
    let back = table.export(&params).unwrap();
    assert_eq!(
        back["ck.0.norm"].as_slice::<f32>(),
        stored.as_slice::<f32>()
    );
}

#[test]
fn export_without_rule_is_an_error() {
    let table = MappingTable::from_rules(vec![Rule::keep("a")]);
    let params: BTreeMap<String, Array> = [("b".to_string(), arange(&[1]))].into();
    let err = table.export(&params).unwrap_err().to_string();
    assert!(err.contains("parameter b"), "{err}");
}

#[test]
fn quantization_companions_follow_their_weight() {
    let table = MappingTable::from_rules(vec![
        Rule::rename("l.{L}.wq.weight", "m.{L}.q.weight"),
        Rule::split(
            "l.{L}.qkv.weight",
            &[("m.{L}.k.weight", 2), ("m.{L}.v.weight", 2)],
            0,
        ),
    ]);
    let plan = table.plan(
        &names(&[
            ("l.0.wq.weight", &[4, 2]),
            ("l.0.wq.scales", &[4, 1]),
            ("l.0.wq.biases", &[4, 1]),
            ("l.0.qkv.weight", &[4, 2]),
            ("l.0.qkv.scales", &[4, 1]),
        ]),
        &shapes(&[
            ("m.0.q.weight", &[4, 2]),
            ("m.0.q.scales", &[4, 1]),
            ("m.0.q.biases", &[4, 1]),
            ("m.0.k.weight", &[2, 2]),
            ("m.0.v.weight", &[2, 2]),
            ("m.0.k.scales", &[2, 1]),
            ("m.0.v.scales", &[2, 1]),
        ]),
    );
    assert!(plan.report.is_clean(), "{:?}", plan.report);
    let exported = table
        .export(
            &[
                ("m.0.k.scales".to_string(), arange(&[2, 1])),
                ("m.0.v.scales".to_string(), arange(&[2, 1])),
            ]
            .into(),
        )
        .unwrap();
    assert_eq!(exported["l.0.qkv.scales"].shape(), &[4, 1]);
}
