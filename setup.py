from setuptools import find_packages, setup

setup(
    name="evo",
    version="0.1.0",
    description="A Triton-kernel-first framework for training large language models",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["evo", "evo.*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.6",
        "triton>=3.0; platform_system == 'Linux'",
        "numpy",
        "tokenizers",
        "tensorboard",
        "tqdm",
    ],
    # transformers (5: rope_parameters): the tests compare each model family with transformers' own model; capped
    # below the next major version, which nobody has tried yet (`make test` prints the versions it runs with)
    # tests/test_notebook.py runs notebooks/kernels_tour.ipynb (nbclient, nbformat, ipykernel); tests/test_bench.py
    # draws the benchmarks' pictures (matplotlib)
    extras_require={"dev": ["pytest", "pytest-benchmark", "datasets", "transformers>=5,<6", "nbclient", "nbformat",
                            "ipykernel", "matplotlib"],
                    "bench": ["matplotlib"],  # bench/run.py's pictures, bench/pipeline.py's schedule timeline
                    "plot": ["matplotlib"]},  # a run's curves.png (monitor.curves) and scripts/plot.py
)
