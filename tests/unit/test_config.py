import pytest
from pydantic import ValidationError

from components.config import MergeSection, TrainSection
from components.profiles import apply_overrides
from pipelines.config import PipelineConfig, load_config

pytestmark = pytest.mark.unit


def test_profiles_load_and_differ():
    local, cluster = load_config("local"), load_config("cluster")
    assert local.profile == "local" and cluster.profile == "cluster"
    assert not local.train.use_gpu and cluster.train.use_gpu
    assert cluster.train.max_steps > local.train.max_steps


def test_overrides_are_typed_like_yaml():
    cfg = load_config(
        "local",
        ["train.max_steps=7", "train.learning_rate=1e-3", "data.labels=[a, b]", "train.gradient_checkpointing=false"],
    )
    assert cfg.train.max_steps == 7 and cfg.train.learning_rate == pytest.approx(1e-3)
    assert cfg.data.labels == ["a", "b"] and cfg.train.gradient_checkpointing is False


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.max_step=3", "max_step"),  # typo in a key
        ("trian.max_steps=3", "trian"),  # typo in a section
        ("train.max_steps=0", "greater than 0"),
        ("train.max_steps", "key=value"),
    ],
)
def test_bad_overrides_are_named(override, message):
    with pytest.raises((ValidationError, ValueError), match=message):
        load_config("local", [override])


def test_qlora_needs_4bit_and_lora_needs_16bit():
    with pytest.raises(ValidationError, match="qlora needs"):
        TrainSection(method="qlora", quantization="none")
    with pytest.raises(ValidationError, match="16-bit base"):
        TrainSection(method="lora", quantization="nf4")
    assert TrainSection(method="lora", quantization="none").quantization == "none"


def test_merge_needs_16bit_base():
    with pytest.raises(ValidationError, match="must be 16-bit"):
        MergeSection(base_precision="nf4")


def test_each_section_round_trips_through_json():
    cfg = load_config("local")
    for name in ("model", "data", "train", "eval", "merge", "quantize", "registry"):
        section = getattr(cfg, name)
        assert type(section).model_validate_json(section.to_json()) == section


def test_a_section_change_leaves_other_sections_digests_alone():
    a = load_config("local")
    b = load_config("local", ["eval.batch_size=3"])
    assert a.eval.digest() != b.eval.digest()
    assert a.train.digest() == b.train.digest() and a.data.digest() == b.data.digest()


def test_unknown_profile_lists_known_ones():
    with pytest.raises(FileNotFoundError, match="local"):
        load_config("nope")


def test_override_into_non_section_is_rejected():
    with pytest.raises(ValueError, match="not a section"):
        apply_overrides({"profile": "x"}, ["profile.sub=1"])
    assert PipelineConfig().registry.model_name


def test_validation_during_training_needs_a_validation_slice():
    with pytest.raises(ValueError, match="data.val_examples"):
        load_config("local", ["train.eval_every=10"])
    with pytest.raises(ValueError, match="train.eval_every"):
        load_config("local", ["train.target_accuracy=0.8", "data.val_examples=50"])
    cfg = load_config("banking77", ["data.path=elsewhere.csv"])
    assert cfg.train.eval_every and cfg.data.val_examples and cfg.data.label_list_in_prompt == "auto"


def test_every_setting_describes_itself_and_the_schema_command_lists_it():
    from typer.testing import CliRunner

    from components.profiles import describe
    from llmops.cli import app
    from serving.settings import DeployerConfig

    rows = describe(PipelineConfig) + describe(DeployerConfig)
    undescribed = [key for key, _, _, meaning in rows if not meaning]
    assert not undescribed, undescribed
    assert {"train.learning_rate", "data.path", "placement.accelerator_type", "deploy.tgi_image"} <= {
        r[0] for r in rows
    }
    listed = CliRunner().invoke(app, ["config", "--schema"], env={"COLUMNS": "400"})
    assert listed.exit_code == 0, listed.output
    for key, _, _, meaning in describe(PipelineConfig):
        line = next(line for line in listed.output.splitlines() if f" {key} " in line)
        assert meaning.split()[0] in line  # the meaning sits on the setting's own row


def test_compiled_parameters_are_described_by_the_same_text(tmp_path):
    import yaml

    from components.config import TrainSection
    from pipelines.finetune import compile_pipeline

    spec = next(yaml.safe_load_all(open(compile_pipeline(load_config("cluster"), str(tmp_path / "f.yaml")))))
    params = spec["root"]["inputDefinitions"]["parameters"]
    assert all(p.get("description") for p in params.values()), [
        k for k, p in params.items() if not p.get("description")
    ]
    lr = TrainSection.model_fields["learning_rate"].description
    assert params["learning_rate"]["description"] == f"{lr} [train.learning_rate]"
    assert "one of auto, alpaca, chat, label" in params["data_format"]["description"]
    count = PipelineConfig.model_fields["placement"].annotation.model_fields["accelerator_count"].description
    assert params["accelerator_count"]["description"] == f"{count} [placement.accelerator_count]"


def test_renamed_keys_still_load_from_profiles_overrides_and_constructors(tmp_path):
    """The deployer's gpu_* settings became accelerator_* (the pipeline's placement and the kfp run form name
    them so): a profile, an override or a constructor using the old name reaches the new field, and giving both
    names is refused naming them."""
    import yaml

    from serving.settings import PROFILE_DIR as DEPLOY_PROFILES
    from serving.settings import DeploySection, load_deployer_config

    assert DeploySection(gpu_count=0, gpu_resource="amd.com/gpu").accelerator_type == "amd.com/gpu"
    deployer = load_deployer_config("cluster", ["deploy.gpu_count=2"]).deploy
    assert (deployer.accelerator_count, deployer.accelerator_type) == (2, "nvidia.com/gpu")
    old_profile = yaml.safe_load((DEPLOY_PROFILES / "cluster.yaml").read_text())
    old_profile["deploy"]["gpu_count"] = old_profile["deploy"].pop("accelerator_count")
    (tmp_path / "old.yaml").write_text(yaml.safe_dump(old_profile))
    assert (
        load_deployer_config(str(tmp_path / "old.yaml"), ["deploy.accelerator_count=3"]).deploy.accelerator_count == 3
    )
    assert load_deployer_config(str(tmp_path / "old.yaml")).deploy.accelerator_count == 1
    with pytest.raises(ValidationError, match="'gpu_count' is the old name of 'accelerator_count'"):
        DeploySection(gpu_count=0, accelerator_count=1)
    for first, second in (("gpu_count", "accelerator_count"), ("accelerator_count", "gpu_count")):
        both = {**old_profile, "deploy": {first: 2, second: 2, "alias": "champion"}}  # either order
        (tmp_path / "both.yaml").write_text(yaml.safe_dump(both, sort_keys=False))
        with pytest.raises(ValueError, match="'gpu_count' is the old name of 'accelerator_count'"):
            load_deployer_config(str(tmp_path / "both.yaml"))
