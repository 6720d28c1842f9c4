//! The networks against libtorch alone (no Python): run with
//! `LIBTORCH_USE_PYTORCH=1 cargo test -p anomalox-tch --release` in a venv that has torch==2.13.0.
//! References are libtorch's own unfused operators and the architectures' stride rules; the
//! checkpoints' numerical agreement with torchvision / the EfficientNet-Lite reference is tested
//! in Python (tests/test_backbone.py).

use tch::{Device, Kind, Tensor};

use anomalox::interrupt::Interrupt;

use super::efficientnet_lite::{EfficientNetLite, LiteConfig};
use super::params::{ConvBn, Padding, StateDict};
use super::resnet::{ResNet, ResNetConfig};
use super::Backbone;

const CPU: (Kind, Device) = (Kind::Float, Device::Cpu);

fn max_abs(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.size(), b.size());
    (a - b).abs().max().double_value(&[])
}

fn entries(named: &[(&str, Tensor)]) -> Vec<(String, Tensor)> {
    named
        .iter()
        .map(|(k, t)| (k.to_string(), t.shallow_clone()))
        .collect()
}

#[test]
fn folded_conv_bn_equals_convolution_then_batch_norm() {
    tch::manual_seed(0);
    let (cin, cout, k) = (5, 7, 3);
    let w = Tensor::randn([cout, cin, k, k], CPU) * 0.2;
    let gamma = Tensor::randn([cout], CPU) * 0.1 + 1.0;
    let beta = Tensor::randn([cout], CPU) * 0.1;
    let mean = Tensor::randn([cout], CPU) * 0.1;
    let var = Tensor::rand([cout], CPU) + 0.5;
    let eps = 1e-3;
    let named = [
        ("c.weight", w.shallow_clone()),
        ("b.weight", gamma.shallow_clone()),
        ("b.bias", beta.shallow_clone()),
        ("b.running_mean", mean.shallow_clone()),
        ("b.running_var", var.shallow_clone()),
    ];
    // Odd sizes and stride 2: TensorFlow SAME pads asymmetrically (the odd pixel after).
    let x = Tensor::randn([2, cin, 11, 14], CPU);
    for (stride, padding) in [(1, Padding::Fixed(1)), (2, Padding::TfSame)] {
        let mut sd = StateDict::new(entries(&named), Device::Cpu, false);
        let unit = ConvBn::load(&mut sd, "c", "b", cin, cout, k, stride, padding, 1, eps);
        sd.finish("test").unwrap();
        let padded = match padding {
            Padding::Fixed(p) => x.constant_pad_nd([p, p, p, p]),
            // 11 -> out 6: total pad (6-1)*2+3-11 = 2 -> (1, 1); 14 -> out 7: 2*6+3-14 = 1 -> (0, 1).
            Padding::TfSame => x.constant_pad_nd([0, 1, 1, 1]),
        };
        let conv = padded.conv2d(&w, None::<Tensor>, [stride, stride], [0, 0], [1, 1], 1);
        let reference = conv.batch_norm(
            Some(&gamma),
            Some(&beta),
            Some(&mean),
            Some(&var),
            false,
            0.0,
            eps,
            false,
        );
        let got = unit.forward(&x);
        assert_eq!(got.size(), reference.size());
        assert!(
            max_abs(&got, &reference) < 1e-4,
            "{stride}: {}",
            max_abs(&got, &reference)
        );
    }
}

#[test]
fn resnet18_taps_have_their_channels_and_strides_and_the_pass_stops_after_the_last() {
    tch::manual_seed(1);
    let config = ResNetConfig {
        bottleneck: false,
        blocks: [2, 2, 2, 2],
        width_per_group: 64,
    };
    let mut sd = StateDict::synthetic();
    let net = ResNet::load(&config, &mut sd);
    let names: Vec<&str> = net.taps().iter().map(|t| t.name.as_str()).collect();
    assert_eq!(names, ["layer1", "layer2", "layer3", "layer4"]);
    let x = Tensor::randn([1, 3, 96, 128], CPU);
    let mut seen = vec![];
    let last = net
        .forward(&x, 1, &Interrupt::never(), &mut |i, t| {
            seen.push((i, t.size()))
        })
        .unwrap();
    // layer1: 64 channels at stride 4, layer2: 128 at stride 8; layer3 and layer4 never run.
    assert_eq!(seen, [(0, vec![1, 64, 24, 32]), (1, vec![1, 128, 12, 16])]);
    assert_eq!(last.size(), [1, 128, 12, 16]);
    for (tap, stride, channels) in [(0, 4, 64), (1, 8, 128), (2, 16, 256), (3, 32, 512)] {
        assert_eq!(net.taps()[tap].stride, stride);
        assert_eq!(net.taps()[tap].channels, channels);
    }
}

#[test]
fn lite0_tap_grids_are_the_input_size_over_the_stride_rounded_up() {
    tch::manual_seed(2);
    let mut sd = StateDict::synthetic();
    let net = EfficientNetLite::load(
        &LiteConfig {
            width: 1.0,
            depth: 1.0,
        },
        &mut sd,
    );
    let (h, w) = (97_i64, 130_i64);
    let x = Tensor::randn([2, 3, h, w], CPU);
    let last = net.taps().len() - 1;
    let mut seen = vec![];
    let _ = net
        .forward(&x, last, &Interrupt::never(), &mut |i, t| {
            seen.push((i, t.size()))
        })
        .unwrap();
    assert_eq!(seen.len(), net.taps().len());
    for ((i, size), tap) in seen.iter().zip(net.taps()) {
        let s = tap.stride;
        assert_eq!(
            size,
            &vec![2, tap.channels, (h + s - 1) / s, (w + s - 1) / s],
            "tap {i} ({})",
            tap.name
        );
    }
    // Lite0: the last stride-8 block is _blocks.4 and the last stride-16 block _blocks.10.
    let last_at = |stride| {
        net.taps()
            .iter()
            .rfind(|t| t.stride == stride)
            .map(|t| t.name.clone())
    };
    assert_eq!(last_at(8).as_deref(), Some("_blocks.4"));
    assert_eq!(last_at(16).as_deref(), Some("_blocks.10"));
}

#[test]
fn a_state_dict_that_does_not_fit_names_missing_mismatched_and_unexpected_keys() {
    let named = [
        ("c.weight", Tensor::zeros([4, 3, 3, 3], CPU)),
        ("b.weight", Tensor::zeros([5], CPU)),
        ("b.bias", Tensor::zeros([4], CPU)),
        ("b.running_mean", Tensor::zeros([4], CPU)),
        ("extra.weight", Tensor::zeros([1], CPU)),
    ];
    let mut sd = StateDict::new(entries(&named), Device::Cpu, false);
    let _ = ConvBn::load(&mut sd, "c", "b", 3, 4, 3, 1, Padding::Fixed(1), 1, 1e-5);
    let err = sd.finish("net").unwrap_err().to_string();
    assert!(err.contains("1 missing key ('b.running_var')"), "{err}");
    assert!(
        err.contains("1 mismatched parameter ('b.weight': expected [4], got [5])"),
        "{err}"
    );
    assert!(err.contains("1 unexpected key ('extra.weight')"), "{err}");
}
