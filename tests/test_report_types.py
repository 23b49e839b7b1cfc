import pytest

from modeling_medmoe import UNKNOWN_REPORT_TYPE, detect_modality, report_type_index
from modeling_medmoe.configuration_medmoe import DEFAULT_EXPERT_NAMES


@pytest.mark.parametrize(
    "report, modality",
    [
        ("PA and lateral chest radiographs demonstrate clear lungs.", "X-ray"),
        ("CXR: right lower lobe consolidation.", "X-ray"),
        ("Portable AP X-ray of the chest shows cardiomegaly.", "X-ray"),
        ("Screening mammogram, BI-RADS 2.", "X-ray"),
        ("Contrast-enhanced CT of the abdomen shows a hypodense hepatic lesion.", "CT"),
        ("Computed tomography of the head without contrast: no hemorrhage.", "CT"),
        ("HRCT shows ground-glass opacities in both lower lobes.", "CT"),
        ("CTA chest negative for pulmonary embolism.", "CT"),
        ("Axial T2-weighted image shows a hyperintense lesion in the pons.", "MRI"),
        ("FLAIR hyperintensities in the periventricular white matter.", "MRI"),
        ("MR of the knee: complex tear of the medial meniscus.", "MRI"),
        ("Magnetic resonance imaging of the lumbar spine.", "MRI"),
        ("Transabdominal ultrasound shows gallstones.", "ultrasound"),
        ("Sonography of the thyroid: a 1 cm hypoechoic nodule.", "ultrasound"),
        ("Echocardiogram with reduced ejection fraction.", "ultrasound"),
        ("H&E stain shows sheets of atypical lymphocytes.", "pathology"),
        ("Histopathology of the biopsy: invasive ductal carcinoma.", "pathology"),
        ("Hematoxylin and eosin section at 40x.", "pathology"),
        ("Fundus photograph of the left eye with drusen.", "fundus"),
        ("Fundoscopy reveals optic disc swelling.", "fundus"),
        ("Retinal photograph with flame haemorrhages.", "fundus"),
        ("Chest radiograph; compare with the prior CT of 2019.", "X-ray"),
        ("CT shows the mass seen on the earlier radiograph.", "CT"),
    ],
)
def test_detects_modality_in_realistic_reports(report, modality):
    assert detect_modality(report) == modality


@pytest.mark.parametrize(
    "report",
    [
        "No acute cardiopulmonary process.",
        "Mr. Smith presented with cough; findings consistent with pneumonia.",
        "The lesion is stable compared with the prior study.",
        "Patient was admitted to the ICU for monitoring.",
        "Melanoma with atypical pigment network.",
        "",
    ],
)
def test_reports_naming_no_modality_are_unknown(report):
    assert detect_modality(report) is None
    assert report_type_index(report, DEFAULT_EXPERT_NAMES) == UNKNOWN_REPORT_TYPE


def test_index_follows_the_configured_expert_names():
    assert report_type_index("Axial CT of the chest.", DEFAULT_EXPERT_NAMES) == DEFAULT_EXPERT_NAMES.index("CT")
    assert report_type_index("Axial CT of the chest.", ["MRI", "ct"]) == 1
    assert report_type_index("Axial CT of the chest.", ["MRI", "X-ray"]) == UNKNOWN_REPORT_TYPE
