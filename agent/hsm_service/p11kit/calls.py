"""The p11-kit RPC call table: call id → name, request and response signatures.

The ids and signature strings are protocol data (draft-ueno-pkcs11-rpc; p11-kit's
rpc-message.h): a request carries its signature string and the server must check it, so
the table has to match p11-kit's letter for letter. Letters: ``y`` byte, ``u`` CK_ULONG
(64-bit), ``v`` version, ``s`` space-padded string, ``z`` NUL-terminated string, ``M``
mechanism, ``aA`` attribute array, ``fA`` attribute buffer (types + lengths), ``ay`` /
``au`` byte / ulong array, ``fy`` / ``fu`` the size of the caller's output buffer.
"""

from __future__ import annotations

from typing import NamedTuple


class Call(NamedTuple):
    name: str
    request: str | None
    response: str


CALLS: tuple[Call, ...] = (
    Call("ERROR", None, "u"),
    Call("C_Initialize", "ayyay", ""),
    Call("C_Finalize", "", ""),
    Call("C_GetInfo", "", "vsusv"),
    Call("C_GetSlotList", "yfu", "au"),
    Call("C_GetSlotInfo", "u", "ssuvv"),
    Call("C_GetTokenInfo", "u", "ssssuuuuuuuuuuuvvs"),
    Call("C_GetMechanismList", "ufu", "au"),
    Call("C_GetMechanismInfo", "uu", "uuu"),
    Call("C_InitToken", "uayz", ""),
    Call("C_OpenSession", "uu", "u"),
    Call("C_CloseSession", "u", ""),
    Call("C_CloseAllSessions", "u", ""),
    Call("C_GetSessionInfo", "u", "uuuu"),
    Call("C_InitPIN", "uay", ""),
    Call("C_SetPIN", "uayay", ""),
    Call("C_GetOperationState", "ufy", "ay"),
    Call("C_SetOperationState", "uayuu", ""),
    Call("C_Login", "uuay", ""),
    Call("C_Logout", "u", ""),
    Call("C_CreateObject", "uaA", "u"),
    Call("C_CopyObject", "uuaA", "u"),
    Call("C_DestroyObject", "uu", ""),
    Call("C_GetObjectSize", "uu", "u"),
    Call("C_GetAttributeValue", "uufA", "aAu"),
    Call("C_SetAttributeValue", "uuaA", ""),
    Call("C_FindObjectsInit", "uaA", ""),
    Call("C_FindObjects", "ufu", "au"),
    Call("C_FindObjectsFinal", "u", ""),
    Call("C_EncryptInit", "uMu", ""),
    Call("C_Encrypt", "uayfy", "ay"),
    Call("C_EncryptUpdate", "uayfy", "ay"),
    Call("C_EncryptFinal", "ufy", "ay"),
    Call("C_DecryptInit", "uMu", ""),
    Call("C_Decrypt", "uayfy", "ay"),
    Call("C_DecryptUpdate", "uayfy", "ay"),
    Call("C_DecryptFinal", "ufy", "ay"),
    Call("C_DigestInit", "uM", ""),
    Call("C_Digest", "uayfy", "ay"),
    Call("C_DigestUpdate", "uay", ""),
    Call("C_DigestKey", "uu", ""),
    Call("C_DigestFinal", "ufy", "ay"),
    Call("C_SignInit", "uMu", ""),
    Call("C_Sign", "uayfy", "ay"),
    Call("C_SignUpdate", "uay", ""),
    Call("C_SignFinal", "ufy", "ay"),
    Call("C_SignRecoverInit", "uMu", ""),
    Call("C_SignRecover", "uayfy", "ay"),
    Call("C_VerifyInit", "uMu", ""),
    Call("C_Verify", "uayay", ""),
    Call("C_VerifyUpdate", "uay", ""),
    Call("C_VerifyFinal", "uay", ""),
    Call("C_VerifyRecoverInit", "uMu", ""),
    Call("C_VerifyRecover", "uayfy", "ay"),
    Call("C_DigestEncryptUpdate", "uayfy", "ay"),
    Call("C_DecryptDigestUpdate", "uayfy", "ay"),
    Call("C_SignEncryptUpdate", "uayfy", "ay"),
    Call("C_DecryptVerifyUpdate", "uayfy", "ay"),
    Call("C_GenerateKey", "uMaA", "u"),
    Call("C_GenerateKeyPair", "uMaAaA", "uu"),
    Call("C_WrapKey", "uMuufy", "ay"),
    Call("C_UnwrapKey", "uMuayaA", "u"),
    Call("C_DeriveKey", "uMuaA", "u"),
    Call("C_SeedRandom", "uay", ""),
    Call("C_GenerateRandom", "ufy", "ay"),
    Call("C_WaitForSlotEvent", "u", "u"),
    Call("C_LoginUser", "uuayay", ""),
    Call("C_SessionCancel", "uu", ""),
    Call("C_MessageEncryptInit", "uMu", ""),
    Call("C_EncryptMessage", "uayayayfy", "ay"),
    Call("C_EncryptMessageBegin", "uayay", ""),
    Call("C_EncryptMessageNext", "uayayfyu", "ay"),
    Call("C_MessageEncryptFinal", "u", ""),
    Call("C_MessageDecryptInit", "uMu", ""),
    Call("C_DecryptMessage", "uayayayfy", "ay"),
    Call("C_DecryptMessageBegin", "uayay", ""),
    Call("C_DecryptMessageNext", "uayayfyu", "ay"),
    Call("C_MessageDecryptFinal", "u", ""),
    Call("C_MessageSignInit", "uMu", ""),
    Call("C_SignMessage", "uayayfy", "ay"),
    Call("C_SignMessageBegin", "uay", ""),
    Call("C_SignMessageNext", "uayayyfy", "ay"),
    Call("C_MessageSignFinal", "u", ""),
    Call("C_MessageVerifyInit", "uMu", ""),
    Call("C_VerifyMessage", "uayayay", ""),
    Call("C_VerifyMessageBegin", "uay", ""),
    Call("C_VerifyMessageNext", "uayayay", ""),
    Call("C_MessageVerifyFinal", "u", ""),
    Call("C_InitToken2", "uays", ""),
)

CALL_IDS: dict[str, int] = {call.name: index for index, call in enumerate(CALLS)}
ERROR_CALL = 0
