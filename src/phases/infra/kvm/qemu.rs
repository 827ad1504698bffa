//! The QEMU command line of a VM, built from its settings without running
//! anything, so it can be pinned by snapshot tests.

use std::path::PathBuf;

/// How QEMU runs guest code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accelerator {
    Kvm,
    Tcg,
}

/// Everything the command line depends on.
#[derive(Debug, Clone)]
pub struct VmSpec {
    pub name: String,
    pub cpus: u32,
    pub memory_mib: u64,
    pub accel: Accelerator,
    pub overlay: PathBuf,
    pub seed: PathBuf,
    /// Direct kernel boot of a root file system, when the image is one.
    pub kernel: Option<(PathBuf, PathBuf)>,
    /// The loopback port forwarded to the guest's SSH port.
    pub ssh_port: u16,
    /// The loopback port forwarded to the guest's Kubernetes API (16443).
    pub api_port: Option<u16>,
    pub user_mac: String,
    pub private_mac: String,
    /// The frame switch's socket of the stack's private network.
    pub switch_socket: PathBuf,
    pub serial_log: PathBuf,
    pub qmp_socket: PathBuf,
    pub pidfile: PathBuf,
}

/// The arguments after the program name (`qemu-system-x86_64`).
pub fn args(vm: &VmSpec) -> Vec<String> {
    let path = |p: &PathBuf| p.display().to_string();
    let (accel, cpu) = match vm.accel {
        Accelerator::Kvm => ("kvm", "host"),
        Accelerator::Tcg => ("tcg,thread=multi", "max"),
    };
    let mut args: Vec<String> = vec![
        "-name".into(),
        vm.name.clone(),
        "-machine".into(),
        "q35".into(),
        "-accel".into(),
        accel.into(),
        "-cpu".into(),
        cpu.into(),
        "-smp".into(),
        vm.cpus.to_string(),
        "-m".into(),
        format!("{}M", vm.memory_mib),
        "-nodefaults".into(),
        "-no-user-config".into(),
        "-display".into(),
        "none".into(),
        "-drive".into(),
        format!(
            "file={},if=virtio,format=qcow2,discard=unmap",
            path(&vm.overlay)
        ),
        "-drive".into(),
        format!("file={},if=virtio,format=raw,readonly=on", path(&vm.seed)),
    ];
    if let Some((kernel, initrd)) = &vm.kernel {
        args.extend([
            "-kernel".into(),
            path(kernel),
            "-initrd".into(),
            path(initrd),
            "-append".into(),
            "root=/dev/vda rw console=ttyS0".into(),
        ]);
    }
    args.extend([
        "-netdev".into(),
        match vm.api_port {
            Some(api) => format!(
                "user,id=user,hostfwd=tcp:127.0.0.1:{}-:22,hostfwd=tcp:127.0.0.1:{api}-:16443",
                vm.ssh_port
            ),
            None => format!("user,id=user,hostfwd=tcp:127.0.0.1:{}-:22", vm.ssh_port),
        },
        "-device".into(),
        format!("virtio-net-pci,netdev=user,mac={}", vm.user_mac),
        "-netdev".into(),
        format!(
            "stream,id=private,server=off,addr.type=unix,addr.path={},reconnect-ms=1000",
            path(&vm.switch_socket)
        ),
        "-device".into(),
        format!("virtio-net-pci,netdev=private,mac={}", vm.private_mac),
        "-serial".into(),
        format!("file:{}", path(&vm.serial_log)),
        "-qmp".into(),
        format!("unix:{},server=on,wait=off", path(&vm.qmp_socket)),
        "-pidfile".into(),
        path(&vm.pidfile),
        "-daemonize".into(),
    ]);
    args
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(accel: Accelerator, kernel: bool) -> VmSpec {
        let run = PathBuf::from("/srv/demo/.stack/demo/control-0");
        VmSpec {
            name: "demo-control-0".into(),
            cpus: 2,
            memory_mib: 4096,
            accel,
            overlay: run.join("disk.qcow2"),
            seed: run.join("seed.img"),
            kernel: kernel.then(|| {
                (
                    PathBuf::from("/images/vmlinuz"),
                    PathBuf::from("/images/initrd.img"),
                )
            }),
            ssh_port: 40022,
            api_port: Some(40443),
            user_mac: "52:54:00:00:00:0a".into(),
            private_mac: "52:54:00:01:00:0a".into(),
            switch_socket: PathBuf::from("/srv/demo/.stack/demo/switch.sock"),
            serial_log: run.join("serial.log"),
            qmp_socket: run.join("qmp.sock"),
            pidfile: run.join("qemu.pid"),
        }
    }

    #[test]
    fn command_lines() {
        insta::assert_snapshot!(
            "kvm_disk_boot",
            args(&spec(Accelerator::Kvm, false)).join("\n")
        );
        insta::assert_snapshot!(
            "tcg_kernel_boot",
            args(&spec(Accelerator::Tcg, true)).join("\n")
        );
    }
}
