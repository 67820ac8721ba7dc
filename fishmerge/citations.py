"""BibTeX of the papers fishmerge implements, cited by `--help` texts and model cards."""

FISHER_MERGING_BIBTEX = """@inproceedings{matena2022merging,
  title     = {Merging Models with Fisher-Weighted Averaging},
  author    = {Matena, Michael and Raffel, Colin},
  booktitle = {Advances in Neural Information Processing Systems},
  year      = {2022},
  eprint    = {2111.09832},
  archivePrefix = {arXiv}
}"""

FEDFISH_BIBTEX = """@article{dhawan2024fedfish,
  title   = {Leveraging Function Space Aggregation for Federated Learning at Scale},
  author  = {Dhawan, Nikita and Mitchell, Nicole and Charles, Zachary and Garrett, Zachary and Dziugaite, Gintare Karolina},
  journal = {Transactions on Machine Learning Research},
  year    = {2024},
  eprint  = {2311.10291},
  archivePrefix = {arXiv}
}"""

FEDAVG_BIBTEX = """@inproceedings{mcmahan2017communication,
  title     = {Communication-Efficient Learning of Deep Networks from Decentralized Data},
  author    = {McMahan, Brendan and Moore, Eider and Ramage, Daniel and Hampson, Seth and y Arcas, Blaise Aguera},
  booktitle = {Proceedings of the 20th International Conference on Artificial Intelligence and Statistics},
  year      = {2017},
  eprint    = {1602.05629},
  archivePrefix = {arXiv}
}"""
