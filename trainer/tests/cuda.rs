//! A whole model's forward + explicit backward on CUDA (float32) against the float64 autograd
//! reference on CPU. Skips with a message without a GPU.
use tch::{Device, Kind, Tensor};
use trainer::config::ModelConfig;
use trainer::eval::shifted;
use trainer::model::Model;

#[test]
fn cuda_model_gradients_match_cpu_reference() {
    if !tch::Cuda::is_available() {
        println!("SKIPPED: no CUDA device visible to libtorch");
        return;
    }
    let text = r#"{"model_type": "llama", "vocab_size": 300, "hidden_size": 256, "intermediate_size": 512,
        "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
        "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 256}}"#;
    let path = std::path::Path::new("config.json");
    let (cfg, _) = ModelConfig::parse(text, path).unwrap();
    let m64 = Model::init_random(cfg.clone(), 0.05, Kind::Double, Device::Cpu, 3).unwrap();
    let named: std::collections::BTreeMap<String, Tensor> =
        m64.named_parameters().into_iter().map(|(n, t)| (n, t.to_kind(Kind::Float).to_device(Device::Cuda(0)))).collect();
    let mcuda = Model::from_named(cfg, named).unwrap();
    let ids: Vec<i64> = (0..777).map(|i| (i * 37 + 11) % 300).collect();
    let (x, y) = shifted(&ids);
    let (loss, grads, stats) = mcuda.forward_backward(&trainer::model::Batch::single(x.shallow_clone(), y.shallow_clone()), None, 128).unwrap();
    let (ref_loss, ref_grads) = trainer::reference::loss_and_grads(&m64, &trainer::model::Batch::single(x, y));
    let mean = loss.sum.to_device(Device::Cpu).double_value(&[]) / loss.count as f64;
    println!("cuda loss {mean:.8} reference {ref_loss:.8}; saved activations {} bytes", stats.saved_bytes);
    assert!((mean - ref_loss).abs() < 1e-5 * ref_loss.abs());
    let mut worst = 0.0f64;
    for (n, g) in &ref_grads {
        let got = grads[n].to_device(Device::Cpu).to_kind(Kind::Double);
        let e = (&got - g).abs().max().double_value(&[]) / g.abs().max().double_value(&[]).max(1e-3);
        assert!(e < 5e-3, "{n}: relative error {e:e}");
        worst = worst.max(e);
    }
    println!("cuda float32 gradients: worst relative error {worst:.2e} over {} tensors", ref_grads.len());
}
