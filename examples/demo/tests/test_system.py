"""Drive an environment from the host with a fixture."""


def test_install_a_config_file(chroot, tmp_path):
    conf = tmp_path / "app.conf"
    conf.write_text("level = 3\n")
    chroot.put(conf, "/etc/app.conf")
    r = chroot.run("grep -c level /etc/app.conf && id -u")
    assert r.returncode == 0
    assert r.stdout == "1\n0\n"


def test_each_test_starts_clean(chroot):
    assert chroot.run(["test", "-e", "/etc/app.conf"]).returncode == 1
