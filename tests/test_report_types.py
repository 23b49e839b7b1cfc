import pytest

from medmoe.training.report_types import detect_modality, report_type_index
from modeling_medmoe import UNKNOWN_REPORT_TYPE
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
        ("MRCP shows a dilated common bile duct.", "MRI"),
        ("Sagittal fast spin-echo image of the knee: meniscal tear.", "MRI"),
        ("Gradient echo sequence shows blooming in the basal ganglia.", "MRI"),
        ("Gradient-recalled echo image with susceptibility artefact.", "MRI"),
        ("Echo time and repetition time were standard.", "MRI"),
        ("Hemorrhage on the 2nd echo of the T2 weighted series.", "MRI"),
        ("Lateral radiograph: compression fracture of the T1 vertebra.", "X-ray"),
        ("Wedge fracture at T2 on the lateral spine radiograph.", "X-ray"),
        ("Lesion is hyperintense on T2 and hypointense on T1.", "MRI"),
        ("CT of the abdomen: thickened gastric fundus wall.", "CT"),
        ("Ultrasound of the uterus: fibroid at the uterine fundus.", "ultrasound"),
        ("Chest Xay of a patient with fever.", "X-ray"),
        ("Dermoscopic image of a melanocytic lesion.", "dermoscopy"),
        ("Chest radiograph. Further evaluation with CT recommended.", "X-ray"),
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
        "Mild wall thickening of the gastric fundus.",
        "Uterine fundus measures 12 cm above the symphysis.",
        "Fracture of the T1 vertebra after a fall.",
        "Biopsy confirmed; histologically proven adenocarcinoma.",
    ],
)
def test_reports_naming_no_modality_are_unknown(report):
    assert detect_modality(report) is None
    assert report_type_index(report, DEFAULT_EXPERT_NAMES) == UNKNOWN_REPORT_TYPE


def test_index_follows_the_configured_expert_names():
    assert report_type_index("Axial CT of the chest.", DEFAULT_EXPERT_NAMES) == DEFAULT_EXPERT_NAMES.index("CT")
    assert report_type_index("Axial CT of the chest.", ["MRI", "ct"]) == 1
    assert report_type_index("Axial CT of the chest.", ["MRI", "X-ray"]) == UNKNOWN_REPORT_TYPE


@pytest.mark.parametrize(
    "report",
    [
        "Chest X-ray and CT images of a 36-year-old man with cough.",
        "Multiple ultrasound and MRI images demonstrating the linguine sign.",
        "CT: mixed density lesion. MRI: enhancing intra-axial component.",
    ],
)
def test_reports_describing_two_modalities_abstain(report):
    """Guessing one of two described modalities would teach the router a wrong label half the time."""
    assert detect_modality(report) is None


def test_a_report_type_outside_the_experts_is_unknown():
    assert report_type_index("Dermoscopy of a pigmented lesion.", DEFAULT_EXPERT_NAMES) == UNKNOWN_REPORT_TYPE
