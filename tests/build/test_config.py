"""The build config: defaults, paths, and a one-line SymphonyError naming the key for every bad value."""
from pathlib import Path

import pytest

from symphony.build.config import BuildConfig, load_config, parse_config, parse_size
from symphony.errors import SymphonyError

ROOT = Path(__file__).resolve().parents[2]


def minimal(**extra):
    return {"sources": [{"name": "a", "path": "src/a", "calibration": ["a.txt"]},
                        {"name": "b", "path": "src/b", "calibration": "b.txt"}], **extra}


def test_defaults_and_paths(tmp_path):
    cfg = parse_config(minimal(), base_dir=tmp_path)
    assert isinstance(cfg, BuildConfig)
    assert cfg.anchor == "a" and cfg.anchor_index == 0 and cfg.expert_sources == ["a", "b"]
    assert cfg.sources[1].path == tmp_path / "src/b" and cfg.sources[1].calibration == [tmp_path / "b.txt"]
    assert cfg.fusion.attention == "slerp" and cfg.fusion.t is None and cfg.fusion.embeddings == "selective"
    assert cfg.alignment.enabled == "auto" and cfg.experts.top_k == 2 and cfg.experts.router_init == "hidden"
    assert cfg.alignment.layers_per_pass == "auto"
    assert cfg.output.max_shard_size == 2 * 10**9 and cfg.output.expert_layout == "per_expert"
    # alignment and stage 2 text default to the sources' calibration files
    assert cfg.calibration_files() == [tmp_path / "a.txt", tmp_path / "b.txt"] == cfg.training_files()
    assert cfg.router_training.steps == 200 and cfg.router_training.device == "auto"


def test_values_pass_through(tmp_path):
    cfg = parse_config(minimal(anchor="b", device="cpu", seed=3,
                               fusion={"attention": "linear", "t": [0.1, 0.9], "norms": "anchor"},
                               alignment={"enabled": False, "calibration": ["mix.txt"], "max_tokens": 1000,
                                          "layers_per_pass": 3},
                               experts={"sources": ["b"], "per_source": 2, "top_k": 1, "router_init": "zeros"},
                               router_training={"steps": 7, "lr": "3e-3", "text": ["train.txt"]},
                               output={"dtype": "bfloat16", "max_shard_size": "1.5MiB", "expert_layout": "fused"}),
                       base_dir=tmp_path)
    assert cfg.anchor_index == 1 and cfg.expert_sources == ["b"] and cfg.fusion.t == [0.1, 0.9]
    assert cfg.alignment.enabled is False and cfg.calibration_files() == [tmp_path / "mix.txt"]
    assert cfg.alignment.layers_per_pass == 3
    assert cfg.training_files() == [tmp_path / "train.txt"]
    assert cfg.router_training.lr == 3e-3 and cfg.router_training.device == "cpu" and cfg.router_training.seed == 3
    assert cfg.output.max_shard_size == int(1.5 * 2**20)
    d = cfg.to_dict()
    assert d["router_training"]["text"] == [str(tmp_path / "train.txt")] and d["anchor"] == "b"


def test_yaml_paths_are_relative_to_the_file(tmp_path):
    (tmp_path / "sub").mkdir()
    path = tmp_path / "sub" / "build.yaml"
    path.write_text("sources:\n  - path: ../one\n  - {path: two, name: second}\nexperts: {router_init: random}\n"
                    "router_training: {steps: 0}\n")
    cfg = load_config(path)
    assert [s.name for s in cfg.sources] == ["one", "second"]
    assert cfg.sources[0].path.resolve() == (tmp_path / "one").resolve()
    assert cfg.sources[1].path == tmp_path / "sub" / "two"


def test_the_example_config_is_valid():
    cfg = load_config(ROOT / "examples" / "build.yaml")
    assert [s.name for s in cfg.sources] == ["general", "coder", "math"] and cfg.anchor == "general"
    assert cfg.router_training.steps == 200 and cfg.alignment.solver == "auto"
    assert cfg.alignment.layers_per_pass == "auto"


@pytest.mark.parametrize("change, words", [
    (dict(fusion={"attn": "slerp"}), ["fusion.attn"]),
    (dict(extra=1), ["'extra'"]),
    (dict(fusion={"attention": "lerp"}), ["fusion.attention", "'lerp'"]),
    (dict(fusion={"t": 1.5}), ["fusion.t", "1.5"]),
    (dict(fusion={"t": [0.5]}), ["fusion.t"]),
    (dict(anchor="c"), ["anchor", "'c'"]),
    (dict(alignment={"enabled": "yes"}), ["alignment.enabled", "'yes'"]),
    (dict(alignment={"enabled": 1}), ["alignment.enabled"]),
    (dict(alignment={"max_tokens": 0}), ["alignment.max_tokens", "0"]),
    (dict(alignment={"solver": "hungarian"}), ["alignment.solver", "'hungarian'"]),
    (dict(alignment={"layers_per_pass": 0}), ["alignment.layers_per_pass", "0", "auto"]),
    (dict(alignment={"layers_per_pass": "all"}), ["alignment.layers_per_pass", "'all'"]),
    (dict(alignment={"layers_per_pass": True}), ["alignment.layers_per_pass"]),
    (dict(experts={"sources": ["a", "z"]}), ["experts.sources", "'z'"]),
    (dict(experts={"per_source": 0}), ["experts.per_source"]),
    (dict(experts={"top_k": 5}), ["experts.top_k", "5"]),
    (dict(experts={"shared_expert": "sum"}), ["experts.shared_expert", "'sum'"]),
    (dict(router_training={"lr": -1}), ["router_training.lr", "-1"]),
    (dict(router_training={"stepz": 3}), ["router_training.stepz"]),
    (dict(output={"max_shard_size": "2 parsecs"}), ["output.max_shard_size", "2 parsecs"]),
    (dict(output={"dtype": "int8"}), ["output.dtype", "'int8'"]),
    (dict(output={"architecture": "GPT2"}), ["output.architecture", "'GPT2'"]),
    (dict(seed=-1), ["seed", "-1"]),
    (dict(device=0), ["device"]),
])
def test_bad_values_name_the_key(change, words):
    with pytest.raises(SymphonyError) as err:
        parse_config(minimal(**change))
    msg = str(err.value)
    assert "\n" not in msg
    for w in words:
        assert w in msg, msg


@pytest.mark.parametrize("data, words", [
    ({"sources": [{"path": "a"}]}, ["sources", "at least 2"]),
    ({"sources": "a"}, ["sources"]),
    ({"sources": [{"path": "x/a"}, {"path": "y/a"}]}, ["'a'", "twice"]),
    ({"sources": [{"name": "a"}, {"path": "b"}]}, ["sources[0].path"]),
    ({"sources": [{"path": "a", "calibration": [3]}, {"path": "b"}]}, ["sources[0].calibration"]),
    ([1, 2], ["mapping"]),
])
def test_bad_sources(data, words):
    with pytest.raises(SymphonyError) as err:
        parse_config(data)
    for w in words:
        assert w in str(err.value), str(err.value)


def test_text_requirements():
    # the hidden router init needs each expert source's own text
    with pytest.raises(SymphonyError, match=r"sources\[1\].*'b'.*has none"):
        parse_config({"sources": [{"path": "a", "calibration": ["a.txt"]}, {"path": "b"}]})
    # stage 2 needs text from somewhere
    with pytest.raises(SymphonyError, match="stage 2 needs text"):
        parse_config({"sources": ["a", "b"], "experts": {"router_init": "zeros"}})
    cfg = parse_config({"sources": ["a", "b"], "experts": {"router_init": "zeros"}, "router_training": {"steps": 0}})
    assert cfg.training_files() == []


def test_yaml_errors(tmp_path):
    with pytest.raises(SymphonyError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("sources: [a, b\n")
    with pytest.raises(SymphonyError, match="cannot read the config") as err:
        load_config(bad)
    assert "\n" not in str(err.value)


def test_parse_size():
    assert parse_size("2GB", "k") == 2 * 10**9 and parse_size("500 MB", "k") == 5 * 10**8
    assert parse_size("1GiB", "k") == 2**30 and parse_size(123, "k") == 123 and parse_size("10kb", "k") == 10**4
    for bad in ("GB", "-1GB", 0, True, "1.5", None):
        with pytest.raises(SymphonyError, match="k: "):
            parse_size(bad, "k")


def test_paper_preset_sets_the_papers_choices_and_explicit_keys_win(tmp_path):
    from symphony.build.presets import PRESETS

    cfg = parse_config(minimal(preset="paper"), base_dir=tmp_path)
    assert cfg.preset == "paper"
    assert (cfg.fusion.attention, cfg.fusion.t, cfg.fusion.embeddings, cfg.fusion.norms) == \
        ("slerp", None, "selective", "linear")
    assert cfg.alignment.enabled is True
    assert (cfg.experts.per_source, cfg.experts.top_k, cfg.experts.shared_expert, cfg.experts.router_init) == \
        (1, 2, "none", "random")
    rt = cfg.router_training
    assert (rt.train, rt.aux_loss_coef, rt.lr, rt.schedule, rt.warmup, rt.seq_len) == \
        ("full", 0.01, 5e-5, "constant", 0.0, 2048)
    assert [rt.lr_at(s) for s in (0, 7, rt.steps - 1)] == [5e-5] * 3  # constant, no warmup
    # the preset's table is not changed by parsing, and the default preset is the dataclasses' defaults
    assert PRESETS["paper"]["router_training"]["lr"] == 5e-5 and "steps" not in PRESETS["paper"]["router_training"]
    plain = parse_config(minimal(), base_dir=tmp_path)
    assert plain.to_dict() == parse_config(minimal(preset="default"), base_dir=tmp_path).to_dict()
    assert plain.router_training.train == "router" and plain.router_training.schedule == "cosine"
    # explicit keys win; a section given as null keeps the preset's section; the resolved config re-parses
    over = parse_config(minimal(preset="paper", alignment={"enabled": False}, experts=None,
                                router_training={"lr": "1e-4", "seq_len": 64}), base_dir=tmp_path)
    assert over.alignment.enabled is False and over.experts.router_init == "random"
    assert over.router_training.lr == 1e-4 and over.router_training.seq_len == 64
    assert over.router_training.schedule == "constant"
    again = parse_config(over.to_dict(), base_dir=tmp_path)
    assert again.to_dict() == over.to_dict()


@pytest.mark.parametrize("preset", ["papers", 1, None])
def test_unknown_preset_is_one_line(preset):
    with pytest.raises(SymphonyError, match=r"^preset: .* is not one of default, paper$"):
        parse_config(minimal(preset=preset))


def test_constant_schedule_warms_up_then_stays():
    from symphony.train import RouterTrainingConfig

    cfg = RouterTrainingConfig(steps=10, lr=1e-3, warmup=0.2, schedule="constant")
    assert [cfg.lr_at(s) for s in range(10)] == pytest.approx([5e-4, 1e-3] + [1e-3] * 8)
    assert RouterTrainingConfig(steps=10, lr=1e-3).lr_at(9) < 1e-3  # cosine stays the default
    with pytest.raises(ValueError, match="router_training.schedule"):
        RouterTrainingConfig(schedule="linear")
