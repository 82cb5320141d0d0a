"""export.py: every artifact is made from a checkpoint trained in the tests, loads in its own runtime and agrees
with the PyTorch model on real MNIST test images; bad input and missing packages end in one line and exit code 2."""
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

import data_loader
import export
from cnn_pytorch import MODELS, build_model
from checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from conftest import made_once

N_EVAL = 2000  # test images checked here; the export command itself checks all 10,000 by default


def run_export(argv):
    """export.main as the shell would see it: the exit code, whether it returned or argparse exited."""
    try:
        return export.main([str(a) for a in argv])
    except SystemExit as stop:
        return stop.code


def one_line_error(capsys):
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("export.py: error: "), err
    return err


@pytest.fixture(scope="module")
def test_batch(mnist_splits):
    """The first N_EVAL real test images, normalised as in training, and their labels."""
    x, y = mnist_splits["test"]
    return data_loader.normalize(x[:N_EVAL]).numpy(), y[:N_EVAL].numpy()


@pytest.fixture(scope="module")
def reference_logits(small_checkpoint, test_batch):
    model, _ = load_checkpoint(small_checkpoint)
    with torch.inference_mode():
        return model(torch.from_numpy(test_batch[0])).numpy()


@pytest.fixture(scope="session")
def exported(small_checkpoint, tmp_path_factory):
    """All three artifacts of the small checkpoint, written by the export command itself (once for all workers)."""
    def export_all(out):
        assert run_export(["--model_path", small_checkpoint, "--format", "all", "--save_dir", out,
                           "--eval_images", N_EVAL, "--calibration_images", 200, "--bench_seconds", 0,
                           "--threads", 1]) == 0
    return made_once(tmp_path_factory, "export", export_all)


@pytest.mark.slow
def test_all_formats_written_with_report(exported):
    assert {p.name for p in exported.iterdir()} == {"simple.pt2", "simple.onnx", "simple_int8.onnx", "report.md"}
    report = (exported / "report.md").read_text()
    assert ("| artifact | file size | test accuracy | CPU latency, batch 1, 1 thread | CPU throughput, batch 256, "
            "1 thread(s) | max logit diff vs fp32 |") in report
    rows = [line for line in report.splitlines() if line.startswith("| ") and "`" in line]
    assert [row.split("`")[1] for row in rows] == ["best_model_simple_pt.pth", "simple.pt2", "simple.onnx",
                                                    "simple_int8.onnx"]
    assert "FAIL" not in report and report.count("- ok: ") == 4
    assert f"first {N_EVAL:,} MNIST test images" in report


@pytest.mark.slow
def test_onnx_is_valid_with_dynamic_batch_and_metadata(exported):
    import onnx
    proto = onnx.load(str(exported / "simple.onnx"))
    onnx.checker.check_model(proto, full_check=True)
    batch_dim = proto.graph.input[0].type.tensor_type.shape.dim[0]
    assert batch_dim.dim_param and not batch_dim.HasField("dim_value")
    meta = {p.key: p.value for p in proto.metadata_props}
    assert float(meta["mnist.normalization_mean"]) == data_loader.MNIST_MEAN
    assert float(meta["mnist.normalization_std"]) == data_loader.MNIST_STD
    assert json.loads(meta["mnist.classes"]) == [str(d) for d in range(10)]


@pytest.mark.slow
def test_onnx_agrees_with_pytorch_on_real_test_images(exported, test_batch, reference_logits):
    model = export.load_onnx_model(exported / "simple.onnx")
    logits = export.predict_logits(model, test_batch[0], batch_size=333)  # uneven batches: the batch is dynamic
    assert (logits.argmax(1) == reference_logits.argmax(1)).all()
    assert np.abs(logits - reference_logits).max() <= 1e-4
    assert model(test_batch[0][:1]).shape == (1, 10)


@pytest.mark.slow
def test_onnx_model_reads_its_own_metadata(exported):
    model = export.load_onnx_model(exported / "simple.onnx")
    assert model.normalization == data_loader.NORMALIZATION
    assert model.classes == [str(d) for d in range(10)] and model.model_name == "simple"


@pytest.mark.slow
def test_int8_is_quantized_small_and_accurate(exported, test_batch, reference_logits):
    import onnx
    proto = onnx.load(str(exported / "simple_int8.onnx"))
    # Unsigned 8-bit weights: signed ones saturate in ONNX Runtime's AVX2 kernels (export.quantize_int8)
    int8_weights = {t.name for t in proto.graph.initializer if t.data_type == onnx.TensorProto.UINT8}
    for layer in ("features.0", "features.3", "classifier.2", "classifier.5"):  # both convs, both linears
        assert f"{layer}.weight_quantized" in int8_weights
    size_ratio = (exported / "simple_int8.onnx").stat().st_size / (exported / "simple.onnx").stat().st_size
    assert size_ratio <= 0.30
    images, labels = test_batch
    logits = export.predict_logits(export.load_onnx_model(exported / "simple_int8.onnx"), images)
    fp32_accuracy = (reference_logits.argmax(1) == labels).mean()
    assert (logits.argmax(1) == labels).mean() >= fp32_accuracy - 0.001


@pytest.mark.slow
def test_artifacts_load_without_our_code(exported, tmp_path, test_batch, reference_logits):
    """A fresh interpreter that cannot import this project runs the .pt2 with torch and the .onnx files with ORT."""
    np.save(tmp_path / "images.npy", test_batch[0][:500])
    script = textwrap.dedent(f"""
        import sys, numpy as np, torch, onnxruntime as ort
        for ours in ("cnn_pytorch", "data_loader", "export"):
            try:
                __import__(ours)
                sys.exit(f"{{ours}} should not be importable here")
            except ImportError:
                pass
        x = np.load("images.npy")
        program = torch.export.load({str(exported / "simple.pt2")!r}).module()
        with torch.inference_mode():
            out = {{"pt2": program(torch.from_numpy(x)).numpy()}}
        for name in ("simple.onnx", "simple_int8.onnx"):
            session = ort.InferenceSession({str(exported)!r} + "/" + name, providers=["CPUExecutionProvider"])
            out[name] = session.run(None, {{"input": x}})[0]
        np.savez("out.npz", **out)
    """)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    out, ref = np.load(tmp_path / "out.npz"), reference_logits[:500]
    for name in ("pt2", "simple.onnx"):
        assert (out[name].argmax(1) == ref.argmax(1)).all() and np.abs(out[name] - ref).max() <= 1e-4
    assert (out["simple_int8.onnx"].argmax(1) == ref.argmax(1)).mean() >= 0.99


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in MODELS if n != "simple"])  # simple is covered by `exported`
def test_every_model_exports_to_onnx_and_int8(name, tmp_path, test_batch, mnist_splits):
    import onnx
    torch.manual_seed(0)
    save_checkpoint(tmp_path / "ckpt.pth", build_model(name).eval(), name, data_loader.NORMALIZATION)
    model, ckpt = load_checkpoint(tmp_path / "ckpt.pth")
    metadata = export.artifact_metadata(ckpt, "ckpt.pth")
    path = export.export_onnx(model, tmp_path / f"{name}.onnx", metadata)
    x = test_batch[0][:64]
    with torch.inference_mode():
        reference = model(torch.from_numpy(x)).numpy()
    assert np.abs(export.load_onnx_model(path)(x) - reference).max() <= 1e-4
    calibration = data_loader.normalize(mnist_splits["train"][0][:200]).numpy()
    int8 = onnx.load(str(export.quantize_int8(path, tmp_path / f"{name}_int8.onnx", calibration, metadata)))
    layers = sum(isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)) for m in model.modules())
    assert sum(t.name.endswith("weight_quantized") and t.data_type == onnx.TensorProto.UINT8
               for t in int8.graph.initializer) == layers  # every conv and linear layer, none left in float


def test_pt2_needs_no_onnx_packages_and_torchscript_points_to_it(small_checkpoint, tmp_path, monkeypatch, capsys):
    for module in export.ONNX_PACKAGES:  # not needed for the .pt2
        monkeypatch.setitem(sys.modules, module, None)
    code = run_export(["--model_path", small_checkpoint, "--format", "pt2", "--save_dir", tmp_path,
                       "--eval_images", 200, "--bench_seconds", 0, "--threads", 1])
    assert code == 0
    assert "torch.export program" in capsys.readouterr().out
    assert {p.name for p in tmp_path.iterdir()} == {"simple.pt2", "report.md"}
    assert run_export(["--model_path", small_checkpoint, "--format", "torchscript", "--save_dir", tmp_path / "ts"]) == 2
    assert "use --format pt2" in one_line_error(capsys) and not (tmp_path / "ts").exists()


def test_foreign_checkpoint_is_one_line_exit_2(tmp_path, capsys):
    foreign = tmp_path / "foreign.pth"
    torch.save({"weights": torch.zeros(3)}, foreign)
    text = tmp_path / "notes.pth"
    text.write_text("not a checkpoint")
    for path, phrase in ((foreign, "not a checkpoint of this project"), (text, "refused"),
                         (tmp_path / "missing.pth", "no such checkpoint file")):
        assert run_export(["--model_path", path, "--save_dir", tmp_path / "out"]) == 2
        assert phrase in one_line_error(capsys)


def test_unknown_format_is_one_line_exit_2(small_checkpoint, tmp_path, capsys):
    assert run_export(["--model_path", small_checkpoint, "--format", "tflite", "--save_dir", tmp_path]) == 2
    assert "invalid choice: 'tflite'" in one_line_error(capsys)


def test_unwritable_output_folder_is_one_line_exit_2(small_checkpoint, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("")  # a folder cannot be made under a file, even by root
    assert run_export(["--model_path", small_checkpoint, "--save_dir", blocker / "export"]) == 2
    assert "cannot write to --save_dir" in one_line_error(capsys)


@pytest.mark.parametrize("missing", export.ONNX_PACKAGES)
def test_missing_onnx_package_is_one_line_exit_2(missing, small_checkpoint, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, missing, None)  # makes `import <missing>` fail as if it were not installed
    out = tmp_path / "out"
    assert run_export(["--model_path", small_checkpoint, "--format", "onnx", "--save_dir", out]) == 2
    err = one_line_error(capsys)
    assert f"{missing} is not installed" in err and "pip install -r requirements.txt" in err
    assert list(out.iterdir()) == []  # nothing written before the check


def test_load_onnx_model_refuses_what_it_cannot_run(tmp_path, monkeypatch):
    import onnx
    from onnx import TensorProto, helper
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "foreign",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), str(tmp_path / "foreign.onnx"))
    (tmp_path / "garbage.onnx").write_bytes(b"\x00not onnx at all")
    for name, phrase in (("foreign.onnx", "not an MNIST model exported by export.py"),
                         ("garbage.onnx", "ONNX Runtime cannot load it"), ("missing.onnx", "no such ONNX file")):
        with pytest.raises(CheckpointError, match=phrase) as err:
            export.load_onnx_model(tmp_path / name)
        assert "\n" not in str(err.value)
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(CheckpointError, match="onnxruntime is not installed"):
        export.load_onnx_model(tmp_path / "foreign.onnx")


@pytest.mark.slow
def test_predict_runs_an_exported_onnx_model_like_the_checkpoint(exported, small_checkpoint, mnist_splits, tmp_path,
                                                                 capsys):
    """predict.py --model_path model.onnx: same preprocessing, same answers, same output format."""
    from PIL import Image

    import predict
    images, _ = mnist_splits["test"]
    paths = []
    for i in range(20):
        path = tmp_path / f"digit_{i}.png"
        Image.fromarray(255 - images[i].numpy()).resize((112, 112)).save(path)  # dark on white, enlarged
        paths.append(str(path))
    answers = {}
    for model_path in (small_checkpoint, exported / "simple.onnx"):
        assert predict.main(["--image_path", *paths, "--model_path", str(model_path), "--json"]) == 0
        rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
        answers[model_path] = rows
    pth, onnx = answers.values()
    assert [r["prediction"] for r in pth] == [r["prediction"] for r in onnx]
    assert max(abs(a - b) for r, s in zip(pth, onnx) for a, b in zip(r["probabilities"], s["probabilities"])) < 1e-4
    with pytest.raises(SystemExit) as refused:
        predict.main(["--image_path", paths[0], "--model_path", str(exported / "simple.onnx"), "--model_type",
                      "improved"])
    assert refused.value.code == 2
    assert "not 'improved'" in capsys.readouterr().err


@pytest.mark.parametrize("n_images, wrong, passes", [(10_000, 10, True), (10_000, 11, False), (500, 1, True),
                                                     (500, 2, False)])
def test_int8_accuracy_limit_is_0_1_points_or_one_image_on_small_checks(tmp_path, n_images, wrong, passes):
    """0.1 points of the PyTorch model's accuracy; on fewer than 1,000 images one image (--eval_images 500: a
    single changed prediction is 0.2 points, which a correct int8 file can give)."""
    row = dict(max_diff=0.0, same_predictions=n_images)
    rows = [dict(row, key="pytorch", path=tmp_path / "m.pth", accuracy=0.99),
            dict(row, key="onnx", path=tmp_path / "m.onnx", accuracy=0.99, size=100),
            dict(row, key="int8", path=tmp_path / "m_int8.onnx", accuracy=0.99 - wrong / n_images, size=25)]
    accuracy_check = export.verify(rows, n_images)[-1]
    assert accuracy_check[0] is passes, accuracy_check[1]
