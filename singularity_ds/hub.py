"""Pretrained towers from the Hugging Face Hub, as the original gets them (``from_pretrained(name)``).

A name that is not a local folder is a Hub repo id (``bert-base-uncased``,
``microsoft/beit-base-patch16-224-pt22k-ft22k``). Its files come through ``huggingface_hub``: downloaded
into the Hugging Face cache when online (``HF_ENDPOINT``, ``HF_HOME`` / ``HF_HUB_CACHE`` and tokens as
``huggingface_hub`` reads them), read from that cache when offline (``HF_HUB_OFFLINE=1``, or no
connection). Only what ``from_pretrained`` would fetch is fetched: ``config.json`` and the first weights
file the repo has (``model.safetensors``, else ``pytorch_model.bin``), never the repo's other formats.
Every failure is one :class:`~.errors.CheckpointError` naming the config key, the repo id and what to do.
"""
import logging
import os

from .errors import CheckpointError

logger = logging.getLogger(__name__)

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")  # transformers' order of preference
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt")  # either makes a BERT tokenizer
TOKENIZER_EXTRAS = ("tokenizer_config.json", "special_tokens_map.json")


def _endpoint() -> str:
    from huggingface_hub import constants
    return constants.ENDPOINT


def _offline() -> bool:
    from huggingface_hub import constants
    return constants.is_offline_mode()


def _cache() -> str:
    from huggingface_hub import constants
    return constants.HF_HUB_CACHE


def _alternatives(key: str) -> str:
    return (f"or pass a local Hugging Face folder ({key}=/path/to/folder), a checkpoint "
            f"(pretrained_path=...), or tower_init=random")


def _fetch(name: str, filename: str, key: str) -> str:
    """One file of repo ``name``: its path in the HF cache, or None when the repo has no such file."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        HFValidationError,
        LocalEntryNotFoundError,
        RemoteEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )
    try:
        return hf_hub_download(name, filename)
    except RemoteEntryNotFoundError:
        return None
    except HFValidationError:
        raise CheckpointError(f"config key {key!r}: {name!r} is neither a local folder nor a Hugging Face "
                              f"Hub repo id (like bert-base-uncased or org/name); check the path") from None
    except GatedRepoError:
        raise CheckpointError(f"config key {key!r}: Hub repo {name!r} is gated: accept its terms on "
                              f"{_endpoint()}/{name} and log in (`hf auth login` or HF_TOKEN)") from None
    except RepositoryNotFoundError:
        raise CheckpointError(f"config key {key!r}: {name!r} is not a model repo on {_endpoint()} (or it is "
                              f"private: log in with `hf auth login` or HF_TOKEN); check the name, "
                              + _alternatives(key)) from None
    except RevisionNotFoundError as e:
        raise CheckpointError(f"config key {key!r}: Hub repo {name!r}: {str(e).splitlines()[0]}") from None
    except LocalEntryNotFoundError as e:
        if _offline():
            # the repo is cached but not this file (the repo lacks it, or it was never needed): skip it
            if filename != "config.json" and _cached(name, "config.json"):
                return None
            raise CheckpointError(
                f"config key {key!r}: HF_HUB_OFFLINE is set and {name!r} is not in the local Hugging Face "
                f"cache ({_cache()}); run once online to download it (unset HF_HUB_OFFLINE), "
                + _alternatives(key)) from None
        cause = e.__cause__ or e.__context__
        why = f"{type(cause).__name__}: {str(cause).splitlines()[0][:120]}" if cause else "no connection"
        raise CheckpointError(
            f"config key {key!r}: cannot download {name!r} from {_endpoint()} ({why}) and it is not in the "
            f"local Hugging Face cache ({_cache()}); check the network (or HF_ENDPOINT), "
            + _alternatives(key)) from None
    except HfHubHTTPError as e:
        raise CheckpointError(f"config key {key!r}: downloading {filename} of {name!r} from {_endpoint()} "
                              f"failed: {str(e).splitlines()[0][:200]}") from None


def _cached(name: str, filename: str) -> bool:
    from huggingface_hub import try_to_load_from_cache
    return isinstance(try_to_load_from_cache(name, filename), str)


def tower_folder(name: str, key: str, weights: bool = True) -> str:
    """A local folder for tower ``name`` (config key ``key``): the folder itself, or the Hub repo's snapshot
    in the HF cache holding ``config.json`` and (``weights``) its weights file, downloaded if needed."""
    if os.path.isdir(name):
        return name
    config = _fetch(name, "config.json", key)
    if config is None:
        raise CheckpointError(f"config key {key!r}: Hub repo {name!r} has no config.json (not a transformers "
                              f"model); " + _alternatives(key))
    if weights:
        if not any(_fetch(name, f, key) is not None for f in WEIGHT_FILES):
            where = (f"the local Hugging Face cache ({_cache()}) holds none of its weights files "
                     f"({', '.join(WEIGHT_FILES)}) and HF_HUB_OFFLINE is set; run once online to fetch them"
                     if _offline() else f"Hub repo {name!r} has none of {', '.join(WEIGHT_FILES)}")
            raise CheckpointError(f"config key {key!r}: {name!r}: {where}; " + _alternatives(key))
        logger.info("%s: %s <- Hugging Face Hub %s (cached in %s)", key, name, _endpoint(), _cache())
    return os.path.dirname(config)


def tokenizer_folder(name: str, key: str = "text_encoder") -> str:
    """A local folder holding the tokenizer of ``name`` (the folder itself, or the Hub repo's snapshot with
    its tokenizer files, downloaded if needed), as the original's ``BertTokenizer.from_pretrained``."""
    if os.path.isdir(name):
        return name
    found = [p for p in (_fetch(name, f, key) for f in TOKENIZER_FILES + TOKENIZER_EXTRAS) if p is not None]
    if not any(os.path.basename(p) in TOKENIZER_FILES for p in found):
        where = " in the local cache" if _offline() else ""
        raise CheckpointError(f"config key {key!r}: {name!r}: the repo has no tokenizer "
                              f"({' or '.join(TOKENIZER_FILES)}){where}; pass a local tokenizer folder "
                              f"({key}=/path/to/folder)")
    return os.path.dirname(found[0])
