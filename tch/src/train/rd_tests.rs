//! Reverse Distillation against libtorch alone: the decoder gives back tensors of the encoder
//! taps' shapes for each architecture, anomalib's parameter counts, the loss and map against the
//! identity 1 − cos(a, b) = 0.5‖a/‖a‖ − b/‖b‖‖², training lowers the loss, and a seed fixes the
//! weights. Comparisons with plain PyTorch are in tests/test_reverse_distillation.py.

use tch::nn;
use tch::{Device, Kind, Tensor};

use anomalox::interrupt::Interrupt;

use super::rd::{self, lite_taps, resnet_taps, RdSpec, ReverseDistillation};
use super::stfpm::{normalize, Combine};
use super::student::InitRng;
use super::{OptimConfig, Optimiser, Schedule, Trainer};
use crate::nets::efficientnet_lite::LiteConfig;
use crate::nets::resnet::ResNetConfig;
use crate::nets::Tap;

const CPU: (Kind, Device) = (Kind::Float, Device::Cpu);

fn resnet(bottleneck: bool, blocks: [usize; 4], width_per_group: i64) -> ResNetConfig {
    ResNetConfig {
        bottleneck,
        blocks,
        width_per_group,
    }
}

fn lite0() -> LiteConfig {
    LiteConfig {
        width: 1.0,
        depth: 1.0,
    }
}

fn pick<'a>(taps: &'a [Tap], names: &[&str]) -> Vec<&'a Tap> {
    names
        .iter()
        .map(|n| taps.iter().find(|t| t.name == *n).expect("a tap"))
        .collect()
}

/// Random encoder taps for an image of `h` × `w`, with the sizes a stride-2 3×3 / TF-"SAME"
/// convolution gives: ceil(n / 2) per halving.
fn random_taps(taps: &[&Tap], batch: i64, h: i64, w: i64) -> Vec<Tensor> {
    let halve = |n: i64, stride: i64| {
        let mut n = n;
        let mut s = 1;
        while s < stride {
            n = (n + 1) / 2;
            s *= 2;
        }
        n
    };
    taps.iter()
        .map(|t| {
            Tensor::randn(
                [batch, t.channels, halve(h, t.stride), halve(w, t.stride)],
                CPU,
            )
        })
        .collect()
}

fn n_params(vs: &nn::VarStore) -> i64 {
    vs.trainable_variables()
        .iter()
        .map(|t| t.numel() as i64)
        .sum()
}

fn check_shapes(spec: &RdSpec, taps: &[&Tap], sizes: &[(i64, i64)]) -> i64 {
    let vs = nn::VarStore::new(Device::Cpu);
    let model = ReverseDistillation::new(&vs.root(), spec, &mut InitRng::new(0));
    for &(h, w) in sizes {
        let encoder = random_taps(taps, 2, h, w);
        let decoded = tch::no_grad(|| model.forward(&encoder, true, &Interrupt::never()).unwrap());
        assert_eq!(decoded.len(), 3);
        for (e, d) in encoder.iter().zip(&decoded) {
            assert_eq!(e.size(), d.size(), "image {h}×{w}");
        }
    }
    n_params(&vs)
}

#[test]
fn decoders_give_back_the_encoder_taps_shapes() {
    // The counts are anomalib 2.7.0's get_bottleneck_layer(name) + get_decoder(name) parameters
    // (sum of numel) less OCBE.conv4 / bn4, which anomalib creates and never uses.
    let names = ["layer1", "layer2", "layer3"];
    let r18 = resnet(false, [2, 2, 2, 2], 64);
    let taps = resnet_taps(&r18);
    let spec = RdSpec::resnet(&r18, &pick(&taps, &names)).unwrap();
    let n = check_shapes(&spec, &pick(&taps, &names), &[(64, 64), (70, 45)]);
    assert_eq!(n, 15_908_480 - 525_312);

    let r50 = resnet(true, [3, 4, 6, 3], 64);
    let taps = resnet_taps(&r50);
    let spec = RdSpec::resnet(&r50, &pick(&taps, &names)).unwrap();
    let n = check_shapes(&spec, &pick(&taps, &names), &[(40, 36)]);
    assert_eq!(n, 55_044_096 - 8_392_704);

    let wrn = resnet(true, [3, 4, 6, 3], 128);
    let taps = resnet_taps(&wrn);
    let spec = RdSpec::resnet(&wrn, &pick(&taps, &names)).unwrap();
    let n = check_shapes(&spec, &pick(&taps, &names), &[(36, 36)]);
    assert_eq!(n, 64_139_776 - 8_392_704);

    let taps = lite_taps(&lite0());
    let chosen = pick(&taps, &["_blocks.2", "_blocks.4", "_blocks.10"]);
    assert_eq!(
        chosen
            .iter()
            .map(|t| (t.channels, t.stride))
            .collect::<Vec<_>>(),
        [(24, 4), (40, 8), (112, 16)]
    );
    let spec = RdSpec::lite(&chosen).unwrap();
    check_shapes(&spec, &chosen, &[(64, 64), (58, 75)]);
}

#[test]
fn taps_must_be_three_at_doubling_strides() {
    let taps = lite_taps(&lite0());
    let err = RdSpec::lite(&pick(&taps, &["_blocks.2", "_blocks.1", "_blocks.10"])).unwrap_err();
    assert!(err.to_string().contains("layers"), "{err}");
    let err = RdSpec::lite(&pick(&taps, &["_blocks.2", "_blocks.4"])).unwrap_err();
    assert!(err.to_string().contains("three taps"), "{err}");
}

#[test]
fn loss_and_map_follow_the_cosine_identity() {
    let shapes = [[2, 6, 8, 8], [2, 10, 4, 4], [2, 12, 2, 2]];
    let e: Vec<Tensor> = shapes.iter().map(|s| Tensor::randn(*s, CPU)).collect();
    let d: Vec<Tensor> = shapes.iter().map(|s| Tensor::randn(*s, CPU)).collect();

    // Identical features: loss and map 0.
    let same = rd::loss(&e, &e).unwrap().double_value(&[]);
    assert!(same.abs() < 1e-6, "{same}");
    let zero = rd::anomaly_map(&e, &e, [16, 16], Combine::Sum).unwrap();
    assert!(zero.abs().max().double_value(&[]) < 1e-6);

    // Loss: per image 0.5‖n(vec e) − n(vec d)‖², mean over the batch, summed over the taps.
    let mut expected = 0.0;
    for (a, b) in e.iter().zip(&d) {
        let flat = |t: &Tensor| t.reshape([2, -1, 1, 1]);
        let per_image = (normalize(&flat(a)) - normalize(&flat(b)))
            .square()
            .sum_dim_intlist([1i64, 2, 3].as_slice(), false, Kind::Float)
            * 0.5;
        expected += per_image.mean(Kind::Float).double_value(&[]);
    }
    let got = rd::loss(&e, &d).unwrap().double_value(&[]);
    assert!((got - expected).abs() < 1e-5, "{got} vs {expected}");

    // Map: per position 0.5‖n(e) − n(d)‖², upsampled with align_corners (the corners keep the
    // values of the feature maps' corners), summed or multiplied over the taps.
    for combine in [Combine::Sum, Combine::Product] {
        let map = rd::anomaly_map(&e, &d, [16, 16], combine).unwrap();
        assert_eq!(map.size(), [2, 16, 16]);
        let corner = |t: &Tensor, i: i64, j: i64| t.get(1).get(i).get(j).double_value(&[]);
        let mut want = if combine == Combine::Sum { 0.0 } else { 1.0 };
        for (a, b) in e.iter().zip(&d) {
            let per = (normalize(a) - normalize(b)).square().sum_dim_intlist(
                [1i64].as_slice(),
                false,
                Kind::Float,
            ) * 0.5;
            let last = per.size()[2] - 1;
            let v = corner(&per, last, 0);
            want = if combine == Combine::Sum {
                want + v
            } else {
                want * v
            };
        }
        let have = corner(&map, 15, 0);
        assert!((have - want).abs() < 1e-5, "{have} vs {want}");
    }
}

fn small_trainer(seed: u64) -> Trainer<ReverseDistillation> {
    let taps = [
        Tap {
            name: "a".into(),
            channels: 8,
            stride: 4,
        },
        Tap {
            name: "b".into(),
            channels: 12,
            stride: 8,
        },
        Tap {
            name: "c".into(),
            channels: 16,
            stride: 16,
        },
    ];
    let spec = RdSpec::lite(&taps.iter().collect::<Vec<_>>()).unwrap();
    let vs = nn::VarStore::new(Device::Cpu);
    let model = ReverseDistillation::new(&vs.root(), &spec, &mut InitRng::new(seed));
    let mut trainer = Trainer::new(vs, model);
    trainer
        .configure(OptimConfig {
            optimiser: Optimiser::Adam {
                beta1: 0.5,
                beta2: 0.999,
                eps: 1e-8,
            },
            learning_rate: 0.005,
            weight_decay: 0.0,
            grad_clip_norm: None,
            schedule: Schedule::Constant,
            total_steps: 100,
        })
        .unwrap();
    trainer
}

fn small_data() -> Vec<Tensor> {
    tch::manual_seed(3);
    // Smooth, correlated features: the three taps are views of one random field.
    let base = Tensor::randn([6, 1, 8, 8], CPU);
    let tap = |c: i64, size: i64| {
        base.upsample_bilinear2d([size, size], false, None, None)
            .repeat([1, c, 1, 1])
            * Tensor::linspace(0.5, 1.5, c, CPU).view([1, c, 1, 1])
            + 0.3
    };
    vec![tap(8, 16), tap(12, 8), tap(16, 4)]
}

#[test]
fn training_lowers_the_loss_and_a_seed_fixes_the_weights() {
    let taps = small_data();
    let run = |seed: u64| {
        let mut trainer = small_trainer(seed);
        let before = trainer
            .evaluate(&taps, &[], 3, &Interrupt::never())
            .unwrap();
        let mut losses = vec![];
        for _ in 0..8 {
            losses.extend(
                trainer
                    .epoch(
                        &taps,
                        &[],
                        &[4, 1, 0, 5, 2, 3],
                        3,
                        None,
                        &Interrupt::never(),
                    )
                    .unwrap(),
            );
        }
        let after = trainer
            .evaluate(&taps, &[], 3, &Interrupt::never())
            .unwrap();
        (before, after, losses, trainer)
    };
    let (before, after, losses, a) = run(1);
    assert_eq!(losses.len(), 16);
    assert!(after < before, "{after} >= {before}");
    assert!(losses[15] < losses[0], "{losses:?}");
    let (_, _, again, b) = run(1);
    assert_eq!(losses, again);
    let (va, vb) = (a.vs.variables(), b.vs.variables());
    assert_eq!(va.len(), vb.len());
    for (name, t) in &va {
        assert!(t.equal(&vb[name]), "{name}");
    }
    let other = small_trainer(2);
    let w = "decoder.layer1.0.conv1.weight";
    assert!(!small_trainer(1).vs.variables()[w].equal(&other.vs.variables()[w]));
}

#[test]
fn parameter_names_mirror_anomalib_s_modules() {
    let r18 = resnet(false, [2, 2, 2, 2], 64);
    let taps = resnet_taps(&r18);
    let spec = RdSpec::resnet(&r18, &pick(&taps, &["layer1", "layer2", "layer3"])).unwrap();
    let vs = nn::VarStore::new(Device::Cpu);
    let _model = ReverseDistillation::new(&vs.root(), &spec, &mut InitRng::new(0));
    let vars = vs.variables();
    let shape = |n: &str| vars.get(n).unwrap_or_else(|| panic!("{n}")).size();
    assert_eq!(shape("bottleneck.conv1.weight"), [128, 64, 3, 3]);
    assert_eq!(
        shape("bottleneck.bn_layer.0.downsample.0.weight"),
        [512, 768, 1, 1]
    );
    assert_eq!(shape("bottleneck.bn_layer.1.bn2.running_var"), [512]);
    assert_eq!(shape("decoder.layer1.0.conv1.weight"), [512, 256, 2, 2]);
    assert_eq!(
        shape("decoder.layer1.0.upsample.0.weight"),
        [512, 256, 2, 2]
    );
    assert_eq!(shape("decoder.layer3.1.conv2.weight"), [64, 64, 3, 3]);
    // N(0, 2 / fan_out): the transposed convolution's fan-out is out · k · k.
    let w = &vars["decoder.layer1.0.conv1.weight"];
    let std = w.std(true).double_value(&[]);
    let want = (2.0f64 / (256.0 * 4.0)).sqrt();
    assert!((std / want - 1.0).abs() < 0.01, "{std} vs {want}");
}
