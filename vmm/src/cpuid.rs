//! CPUID for each vCPU: KVM's supported set, with APIC ids and a topology of `n` cores in
//! one socket, one thread per core.

use kvm_bindings::CpuId;

const LEAF_FEATURES: u32 = 0x1;
const LEAF_CACHE_TOPOLOGY: u32 = 0x4;
const LEAF_EXT_TOPOLOGY: u32 = 0xb;
const LEAF_AMD_EXT_FEATURES: u32 = 0x8000_0001;
const LEAF_AMD_SIZE_IDS: u32 = 0x8000_0008;
const LEAF_AMD_EXT_APIC_ID: u32 = 0x8000_001e;

const ECX_HYPERVISOR: u32 = 1 << 31;
const EDX_HTT: u32 = 1 << 28;
const ECX_AMD_TOPOEXT: u32 = 1 << 22;
const ECX_AMD_CMP_LEGACY: u32 = 1 << 1;

/// Bits needed to number `n` cores.
fn id_bits(n: u32) -> u32 {
    if n <= 1 {
        0
    } else {
        32 - (n - 1).leading_zeros()
    }
}

/// Adjusts `cpuid` (from KVM_GET_SUPPORTED_CPUID) for vCPU `index` of `count`.
pub fn normalize(cpuid: &mut CpuId, index: u32, count: u32) {
    let shift = id_bits(count);
    for e in cpuid.as_mut_slice().iter_mut() {
        match e.function {
            LEAF_FEATURES => {
                // EBX[31:24] initial APIC id, EBX[23:16] logical processors per package.
                e.ebx = (e.ebx & 0x0000_ffff) | (index << 24) | ((count.min(255)) << 16);
                e.ecx |= ECX_HYPERVISOR;
                if count > 1 {
                    e.edx |= EDX_HTT;
                } else {
                    e.edx &= !EDX_HTT;
                }
            }
            LEAF_CACHE_TOPOLOGY => {
                // EAX[31:26] cores per package - 1; EAX[25:14] threads sharing this cache - 1:
                // private L1/L2, a shared last level.
                let level = (e.eax >> 5) & 0x7;
                let sharing = if level >= 3 { count - 1 } else { 0 };
                e.eax = (e.eax & 0x3fff) | ((count - 1) << 26) | (sharing << 14);
            }
            LEAF_EXT_TOPOLOGY => {
                e.edx = index;
                match e.index {
                    0 => {
                        // SMT level: one thread per core.
                        e.eax = 0;
                        e.ebx = 1;
                        e.ecx = 1 << 8;
                    }
                    1 => {
                        // Core level: `count` cores.
                        e.eax = shift;
                        e.ebx = count;
                        e.ecx = 1 | (2 << 8);
                    }
                    i => {
                        e.eax = 0;
                        e.ebx = 0;
                        e.ecx = i;
                    }
                }
            }
            LEAF_AMD_EXT_FEATURES => {
                // No TOPOEXT: the guest then takes its topology from 0x8000_0008, set below.
                e.ecx &= !ECX_AMD_TOPOEXT;
                if count > 1 {
                    e.ecx |= ECX_AMD_CMP_LEGACY;
                } else {
                    e.ecx &= !ECX_AMD_CMP_LEGACY;
                }
            }
            LEAF_AMD_SIZE_IDS => {
                // ECX[15:12] APIC id bits for cores, ECX[7:0] cores - 1.
                e.ecx = (e.ecx & !0xf0ff) | (shift << 12) | (count - 1);
            }
            LEAF_AMD_EXT_APIC_ID => {
                e.eax = index;
                e.ebx = index & 0xff;
                e.ecx = 0;
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvm_bindings::kvm_cpuid_entry2;

    fn entry(function: u32, index: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            ..Default::default()
        }
    }

    #[test]
    fn apic_ids_and_topology() {
        let mut c = CpuId::from_entries(&[
            entry(1, 0),
            entry(0xb, 0),
            entry(0xb, 1),
            entry(0x8000_0008, 0),
        ])
        .unwrap();
        normalize(&mut c, 2, 3);
        let s = c.as_slice();
        assert_eq!(s[0].ebx >> 24, 2);
        assert_eq!((s[0].ebx >> 16) & 0xff, 3);
        assert_ne!(s[0].ecx & ECX_HYPERVISOR, 0);
        assert_eq!((s[1].ebx, s[1].edx), (1, 2));
        assert_eq!((s[2].eax, s[2].ebx, s[2].ecx >> 8), (2, 3, 2));
        assert_eq!(s[3].ecx & 0xff, 2);
        assert_eq!(id_bits(1), 0);
        assert_eq!(id_bits(2), 1);
        assert_eq!(id_bits(32), 5);
    }
}
