from pathlib import Path

from setuptools import find_packages, setup

requirements = [line.strip() for line in Path(__file__).with_name("requirements.txt").read_text().splitlines()
                if line.strip() and not line.startswith("#")]

setup(
    name="gpt2-beam",
    version="0.1.0",
    description="Distributed batch generation with GPT-2 and Llama-family models as TensorFlow graphs on Apache Beam",
    python_requires=">=3.10",
    packages=find_packages(include=["lmgraph", "lmgraph.*", "pipeline", "pipeline.*", "transforms", "transforms.*"]),
    install_requires=requirements,
    extras_require={
        # The reference implementation for parity tests, real services and the sdist builder for the tests; never at
        # run time.
        "test": ["pytest>=7", "torch==2.13.0", "transformers>=4.40", "tokenizers>=0.15", "gcp-storage-emulator",
                 "build"],
        # The CPU engines bench.whole_job compares with (bench/peers.py); never at run time.
        "peers": ["ctranslate2", "openvino-genai", "openvino-tokenizers", "optimum-intel[openvino]", "torch==2.13.0",
                  "transformers>=4.40"],
    },
)
