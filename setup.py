"""Maps the card's top-level folders onto the robot_rl namespace (DESIGN §2).

`hardware/` installs as `robot_rl.hardware` (and, once they exist, `actor/` and `learner/` as `robot_rl.actor` and
`robot_rl.learner`), both for `pip install .` and `pip install -e .`. Everything else lives in pyproject.toml.
"""

from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).parent
FOLDERS = {
    "robot_rl": "robot_rl",
    "robot_rl.hardware": "hardware",
    "robot_rl.actor": "actor",
    "robot_rl.learner": "learner",
}

package_dir: dict[str, str] = {}
packages: list[str] = []
for name, folder in FOLDERS.items():
    if not (ROOT / folder / "__init__.py").is_file():
        continue
    package_dir[name] = folder
    packages.append(name)
    packages += [f"{name}.{sub}" for sub in find_packages(str(ROOT / folder))]

setup(packages=packages, package_dir=package_dir, package_data={"robot_rl": ["py.typed"]})
